"""Student pipelines that diffusers has no class for.

ClassConditionalPipeline serves class-conditional pixel UNets (the embedded digits teacher
and its students). It is a plain diffusers DiffusionPipeline: `save_pretrained` and
`ClassConditionalPipeline.from_pretrained(dir)` work as for any pipeline, and its loop runs
whatever scheduler the export wrote (DDIM, LCM, TCD, Euler ...).

FlowGridScheduler is FlowMatchEulerDiscreteScheduler on a flow student's trained grid, with TCD's
stochastic step: what diffusers' own flow scheduler cannot do. Any pipeline that takes a
FlowMatchEulerDiscreteScheduler (StableDiffusion3Pipeline, FluxPipeline) loads it from a saved
directory while stepdistill is importable: model_index.json names it ["stepdistill.pipelines",
"FlowGridScheduler"], and diffusers imports that module.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  diffusers' loader finds a
# component's base class (here SchedulerMixin) by name in the component's own module, this one
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
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
            scale = getattr(self.scheduler, "scale_model_input", None)  # flow-matching schedulers have none
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


class FlowGridScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler whose `set_timesteps(K)` gives the grid stepdistill's flow students train on.

    Without explicit sigmas, K steps run on sigmas shift(k / K), k = K .. 1, then 0 (PCM's SD3 phase edges; the
    parent ends at shift(shift(1 / T)), about 0.009 at shift 3, so its last step is nearly the identity). Explicit
    `sigmas` (Flux's pipeline passes linspace(1, 1/K, K), the same grid) are taken as the parent takes them.

    gamma > 0 is TCD's strategic stochastic sampling (Zheng et al. 2024; stepdistill.samplers.sample_tcd): the DDIM
    jump to s = (1 - gamma) sigma_next, then the forward process back up to sigma_next with fresh noise; gamma = 0
    is the parent's deterministic Euler step, and stochastic_sampling (consistency sampling) works as the parent's.
    The fresh noise comes from the generator passed to `step` (ClassConditionalPipeline passes the pipeline's),
    else from `noise_generator` (StableDiffusion3Pipeline and FluxPipeline pass none to the scheduler: set
    `pipe.scheduler.noise_generator = torch.Generator(device).manual_seed(seed)` for reproducible samples), else
    from torch's global generator.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: float | None = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False, gamma: float = 0.0):
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift,
                         use_dynamic_shifting=use_dynamic_shifting, base_shift=base_shift, max_shift=max_shift,
                         base_image_seq_len=base_image_seq_len, max_image_seq_len=max_image_seq_len,
                         invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
                         use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                         use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type,
                         stochastic_sampling=stochastic_sampling)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma = {gamma} must lie in [0, 1] (0: deterministic Euler, 1: consistency sampling)")
        if gamma and stochastic_sampling:
            raise ValueError("gamma (TCD) and stochastic_sampling (consistency sampling) are two samplers; set one")
        self.noise_generator = None

    init_noise_sigma = 1.0  # pipelines written for VP schedulers (ClassConditionalPipeline) read these two

    def scale_model_input(self, sample, timestep=None):
        return sample

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None and num_inference_steps:
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True):
        generator = generator if generator is not None else self.noise_generator
        gamma = self.config.gamma
        if not gamma or per_token_timesteps is not None:
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise,
                                generator=generator, per_token_timesteps=per_token_timesteps, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x, u = sample.float(), model_output.float()
        x0, eps = x - sigma * u, x + (1 - sigma) * u
        s = (1 - gamma) * sigma_next
        prev = (1 - s) * x0 + s * eps
        if i + 2 < len(self.sigmas):  # every step but the last re-noises from s up to sigma_next
            ratio = (1 - sigma_next) / (1 - s)
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            prev = ratio * prev + (sigma_next ** 2 - (ratio * s) ** 2).clamp(min=0).sqrt() * noise
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)
