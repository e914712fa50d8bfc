"""Shared helpers for tests: tiny run configs on saved tiny teachers."""

from __future__ import annotations

import torch

from stepdistill.config import load_config
from stepdistill.paths import CONFIGS

FAST = ["train.progress_bar=false", "train.report_to=none", "train.batch_size=4", "train.num_sample_images=4"]


def tiny_config(config_file: str, teacher, output_dir, *overrides):
    """A real config file from training_configs/, pointed at a tiny teacher (and its own VAE: a config's `vae` is
    the real teacher's), with sizes overridden."""
    return load_config(CONFIGS / config_file, [f"teacher={teacher}", "vae=null", f"output_dir={output_dir}", *FAST,
                                               *overrides])


def student_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.distiller.student.state_dict().items()}


def assert_pipeline_matches_own_sampler(trainer, pipe, steps_list, own_kwargs=None, pipe_kwargs=None):
    """stepdistill's sampler and the exported ClassConditionalPipeline, from the same noise and generator seed, give
    the same images at every step count (own_kwargs go to Distiller.sample, pipe_kwargs to the pipeline)."""
    labels = torch.tensor([0, 3, 7])
    for steps in steps_list:
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(3, 1, 8, 8, generator=g)
        ours = trainer.distiller.sample(noise, {"class_labels": labels}, steps, generator=g,
                                        networks=trainer.export_networks(), **(own_kwargs or {}))
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(3, 1, 8, 8, generator=g)
        theirs = pipe(class_labels=labels, num_inference_steps=steps, latents=noise, generator=g, output_type="pt",
                      **(pipe_kwargs or {})).images
        torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-4, rtol=1e-4)
