"""FID during training: `make_evaluator(cfg)` gives the trainer's `evaluator(distiller, networks, step) -> dict` hook.

Samples come from the student pipeline the distiller builds from the given networks (what an export would hold).

Every evaluation draws the same noise and labels (seeded per sample, apart from the training RNG), so the
logged curve moves only with the weights. The reference is the run's own data: the embedded digits with
the digits classifier, or the image folder with Inception; its statistics come from the cache after the
first run.
"""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..errors import ConfigError
from .fid import Statistics, cached_statistics, create_extractor, extract, frechet_distance
from .sources import GeneratedSource


def reference_for(cfg: RunConfig):
    """(source, extractor name, weights) the run is measured against."""
    from ..paths import DIGITS_CLASSIFIER
    from .features import DIGITS_EXTRACTOR, resolve_inception
    from .sources import FolderSource, digits_source

    if cfg.data.dataset == "digits":
        return digits_source(), DIGITS_EXTRACTOR, str(DIGITS_CLASSIFIER)
    if cfg.data.dataset == "folder":
        return FolderSource(cfg.data.path, cfg.data.resolution), *resolve_inception()
    raise ConfigError(f"eval.every = {cfg.eval.every} needs reference images: data.dataset digits or folder "
                      f"(got {cfg.data.dataset!r}); or set eval.every=0 and run `stepdistill fid` on the export")


def make_evaluator(cfg: RunConfig, batch_size: int = 250):
    """The trainer hook logging `fid/<k>step` for k in eval.steps (default export.steps)."""
    source, name, weights = reference_for(cfg)  # fails before training when there is no reference
    steps = list(cfg.eval.steps or cfg.export.steps)
    state = {}

    def evaluator(distiller, networks, step) -> dict:
        device = torch.device(distiller.device)
        # building the extractor initialises layers and sampling draws noise: none of it may move the training RNG
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return measure(distiller, networks, device)

    def measure(distiller, networks, device) -> dict:
        from ..sampling import pipeline_images

        if "ref" not in state:
            state["extractor"] = create_extractor(name, weights, device)
            state["ref"] = cached_statistics(source, state["extractor"], batch_size, progress=False)
        extractor, info = state["extractor"], distiller.teacher_info
        if info.conditioner.kind == "text":
            raise ConfigError("eval.every does not support text-to-image teachers yet; use `stepdistill fid` "
                              "on the exported student")
        logs = {}
        for k in steps:
            pipe = distiller.build_pipeline(networks, k)
            pipe.set_progress_bar_config(disable=True)

            def make(start, n, generators, pipe=pipe, k=k):
                noise = torch.stack([torch.randn(info.sample_shape, generator=g) for g in generators]).to(device)
                raw = info.conditioner.example_conditions(start + n)
                raw = {key: v[start:] for key, v in raw.items()}
                gen = torch.Generator(device).manual_seed(generators[0].initial_seed())  # re-noising steps
                return pipeline_images(pipe, n, k, generator=gen, guidance=distiller.eval_guidance_scales()[0],
                                       conditions=raw, latents=noise, **distiller.pipeline_kwargs()).float().cpu()

            samples = GeneratedSource(make, cfg.eval.num_samples, f"{k}-step samples", seed=cfg.seed + 4321)
            feats = extract(samples, extractor, batch_size, progress=False)["features"]
            stats = Statistics.from_features(feats, extractor.key, samples.label)
            logs[f"fid/{k}step"] = frechet_distance(stats, state["ref"])
        return logs

    return evaluator
