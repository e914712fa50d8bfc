"""Tiny random diffusers models and pipelines, built and saved by the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler,
                       SD3Transformer2DModel, Transformer2DModel, UNet2DConditionModel, UNet2DModel)

from stepdistill.pipelines import ClassConditionalPipeline


def tiny_unet(class_cond: bool = False, channels: int = 1, size: int = 8) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       num_class_embeds=11 if class_cond else None)


def tiny_class_unet(size: int = 8, time_cond_proj_dim=None) -> UNet2DConditionModel:
    """The digits teacher's architecture at toy size: self-attention only, 11 class embeddings (10 = null)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=size, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D",
                                num_class_embeds=11, time_cond_proj_dim=time_cond_proj_dim)


def tiny_text_unet(cross_dim: int = 16, channels: int = 4, size: int = 8) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim)


def tiny_dit(size: int = 8, channels: int = 4) -> Transformer2DModel:
    torch.manual_seed(0)
    return Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=2 * channels,
                              num_layers=1, sample_size=size, patch_size=2, norm_type="ada_norm_zero",
                              num_embeds_ada_norm=10, norm_num_groups=4)


def tiny_sd3(size: int = 8, channels: int = 4) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=size, patch_size=2, in_channels=channels, out_channels=channels,
                                 num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16)


def vp_scheduler(prediction_type: str = "v_prediction", beta_schedule: str = "squaredcos_cap_v2") -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type,
                         timestep_spacing="trailing", clip_sample=False)


def save_class_teacher(path: Path, size: int = 8) -> Path:
    """A tiny class-conditional pipeline shaped like the embedded digits teacher."""
    pipe = ClassConditionalPipeline(unet=tiny_class_unet(size), scheduler=vp_scheduler(), null_class=10, num_classes=10)
    pipe.save_pretrained(path)
    return path


def save_unconditional_teacher(path: Path, size: int = 8) -> Path:
    """A tiny unconditional DDPMPipeline (a pipeline class that lives in diffusers)."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    DDPMPipeline(unet=tiny_unet(size=size), scheduler=sched).save_pretrained(path)
    return path


def flow_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
