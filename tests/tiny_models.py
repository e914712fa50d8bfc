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


def save_class_flow_teacher(path: Path, size: int = 8, shift: float = 2.0) -> Path:
    """The flow-matching digits teacher's kind at toy size: velocity prediction, FlowMatchEulerDiscreteScheduler."""
    pipe = ClassConditionalPipeline(unet=tiny_class_unet(size), scheduler=flow_scheduler(shift), null_class=10,
                                    num_classes=10)
    pipe.save_pretrained(path)
    return path


def save_unconditional_teacher(path: Path, size: int = 8) -> Path:
    """A tiny unconditional DDPMPipeline (a pipeline class that lives in diffusers)."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    DDPMPipeline(unet=tiny_unet(size=size), scheduler=sched).save_pretrained(path)
    return path


def flow_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


# ----------------------------------------------------------------------------- text-to-image pipelines
# Tiny SD1.5 / SDXL / SD3 pipelines: a CLIP tokenizer from a vocab.json + merges.txt written here,
# CLIP text encoders from small configs, a small UNet / SD3 transformer and AutoencoderKL. Saved with
# safetensors and loaded back as teachers (stepdistill.load_teacher), all offline.

TOKEN_WORDS = ["a", "the", "of", "on", "photo", "cat", "dog", "red", "blue", "apple", "table", "hat", "painting"]
TEXT_MAX_LENGTH = 16


def write_tiny_tokenizer(path: Path) -> Path:
    """A CLIPTokenizer folder: characters, their end-of-word forms and a few whole words with their merges."""
    import json

    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = []
    for word in TOKEN_WORDS:  # left-to-right merges building each word's end-of-word token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
            if merged not in vocab:
                vocab.append(merged)
            pieces = [merged] + pieces[2:]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(path, model_max_length=TEXT_MAX_LENGTH)
    tok.save_pretrained(path)
    return path


def tiny_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(path))


def tiny_clip(vocab_size: int, hidden: int = 16, projection: int | None = None, seed: int = 0):
    """CLIPTextModel, or CLIPTextModelWithProjection when `projection` is given (SDXL's and SD3's pooled text)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=projection or hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def tiny_vae(latent_channels: int = 4, scaling_factor: float = 1.5, shift_factor: float | None = None):
    """AutoencoderKL with two blocks: 16x16 images <-> 8x8 latents (vae_scale_factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def sd15_scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.5's scheduler settings (epsilon, scaled_linear, no final alpha one)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def small_sd15_unet(size: int = 16) -> UNet2DConditionModel:
    """An SD1.5-shaped UNet (three cross-attention levels, two layers per block) of about 7M parameters,
    for benchmarks where the tiny one is too small to show memory differences."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=size, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(64, 128, 128), norm_num_groups=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16)


def save_sd15_teacher(path: Path, unet: UNet2DConditionModel | None = None) -> Path:
    """A tiny StableDiffusionPipeline (CLIP text, 4-channel latents, cross-attention UNet)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    tok = tiny_tokenizer(path.parent / f"{path.name}-tok")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_clip(len(tok)), tokenizer=tok,
                                   unet=unet or tiny_text_unet(cross_dim=16), scheduler=sd15_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def save_sdxl_teacher(path: Path) -> Path:
    """A tiny StableDiffusionXLPipeline: two CLIP encoders (pooled + time ids via added_cond_kwargs)."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    tok = tiny_tokenizer(path.parent / f"{path.name}-tok")
    te1, te2 = tiny_clip(len(tok), 16), tiny_clip(len(tok), 16, projection=8, seed=1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=6 * 4 + 8, transformer_layers_per_block=1)
    sched = sd15_scheduler()
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(scaling_factor=1.2), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(path)
    return path


def save_sd3_teacher(path: Path) -> Path:
    """A tiny StableDiffusion3Pipeline: CLIP-L and CLIP-G with projections, no T5, a flow-matching transformer."""
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    tok = tiny_tokenizer(path.parent / f"{path.name}-tok")
    te1, te2 = tiny_clip(len(tok), 16, projection=8), tiny_clip(len(tok), 16, projection=8, seed=1)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=flow_scheduler(3.0),
                                    vae=tiny_vae(scaling_factor=1.5, shift_factor=0.1), text_encoder=te1, tokenizer=tok,
                                    text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path)
    return path


def write_caption_folder(path: Path, n: int = 8, size: int = 16) -> Path:
    """A few random RGB images with captions in metadata.jsonl (ImageCaptionFolder's format)."""
    import json

    import numpy as np
    from PIL import Image

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a photo of a {TOKEN_WORDS[5 + i % 4]}"})
    (path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_prompt_file(path: Path) -> Path:
    path = Path(path)
    path.write_text("a red apple on the table\na blue cat\na painting of a dog\na photo of a hat\n")
    return path
