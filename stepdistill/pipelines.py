"""Student pipelines that diffusers has no class for.

ClassConditionalPipeline serves class-conditional pixel UNets (the embedded digits teacher
and its students). It is a plain diffusers DiffusionPipeline: `save_pretrained` and
`ClassConditionalPipeline.from_pretrained(dir)` work as for any pipeline, and its loop runs
whatever scheduler the export wrote (DDIM, LCM, TCD, Euler ...).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor

from .conditioning import guidance_embedding
from .denoiser import call_model


class ClassConditionalPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Class-conditional image generation with classifier-free guidance or a guidance embedding.

    UNet LoRAs load as for Stable Diffusion: `pipe.load_lora_weights(dir)`, then `pipe.fuse_lora()`."""

    model_cpu_offload_seq = "unet"
    _lora_loadable_modules = ["unet", "text_encoder"]
    text_encoder = None  # the LoRA loader looks for one; class-conditional pipelines have none

    def __init__(self, unet, scheduler, null_class: int | None = None, num_classes: int = 10,
                 default_steps: int = 50):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(null_class=null_class, num_classes=num_classes, default_steps=default_steps)

    @torch.no_grad()
    def __call__(self, class_labels=None, num_inference_steps: int | None = None, guidance_scale: float = 1.0,
                 generator=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, batch_size: int | None = None, **scheduler_kwargs):
        device = self._execution_device
        if class_labels is None:
            n = batch_size or self.config.num_classes
            class_labels = torch.arange(n) % self.config.num_classes
        labels = torch.as_tensor(class_labels).reshape(-1).long().to(device)
        n = labels.shape[0]
        cfg = self.unet.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = latents.to(device) if latents is not None else randn_tensor(shape, generator=generator, device=device)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers have none (1)

        steps = num_inference_steps or self.config.default_steps
        self.scheduler.set_timesteps(steps, device=device)
        extra = {}
        embedded_w = cfg.get("time_cond_proj_dim") is not None
        if embedded_w:
            w = torch.full((n,), guidance_scale - 1.0)
            extra["timestep_cond"] = guidance_embedding(w, cfg.time_cond_proj_dim).to(device)
        use_cfg = not embedded_w and guidance_scale != 1.0
        if use_cfg and self.config.null_class is None:
            raise ValueError("this pipeline has no null class, so it cannot use classifier-free guidance")

        for t in self.progress_bar(self.scheduler.timesteps):
            scale = getattr(self.scheduler, "scale_model_input", None)
            x_in = scale(x, t) if scale is not None else x
            ts = torch.full((n,), float(t), device=device)
            if use_cfg:
                null = torch.full_like(labels, self.config.null_class)
                out = call_model(self.unet, torch.cat([x_in, x_in]), torch.cat([ts, ts]),
                                 {"class_labels": torch.cat([labels, null])})
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            else:
                out = call_model(self.unet, x_in, ts, {"class_labels": labels, **extra})
            x = self.scheduler.step(out, t, x, generator=generator, **scheduler_kwargs).prev_sample

        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            pass
        else:
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
