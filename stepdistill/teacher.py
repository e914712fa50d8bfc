"""Load a diffusers pipeline (directory or hub id, safetensors only) as a frozen Teacher."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .conditioning import ClassConditioner, Conditioner, LatentCodec, PixelCodec
from .denoiser import Denoiser, denoiser_for
from .errors import StepdistillError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Teacher:
    """Everything a distiller needs from the teacher pipeline."""

    pipeline: object
    denoiser: Denoiser
    conditioner: Conditioner
    codec: nn.Module
    sample_shape: tuple[int, int, int]  # (C, H, W) in the space the network denoises
    source: str

    @property
    def model(self) -> nn.Module:
        return self.denoiser.model

    @property
    def model_key(self) -> str:
        """The pipeline component that holds the denoising network: 'unet' or 'transformer'."""
        return "unet" if hasattr(self.pipeline, "unet") and self.pipeline.unet is not None else "transformer"

    @property
    def pipeline_class(self) -> str:
        return type(self.pipeline).__name__

    def encode_batch(self, batch: dict, device) -> tuple[torch.Tensor | None, dict]:
        """Data batch -> (x0 in model space or None for data-free batches, model keyword arguments)."""
        x0 = None
        if "pixel_values" in batch:
            x0 = self.codec.encode(batch["pixel_values"].to(device))
        return x0, self.conditioner.encode(batch, device)

    def batch_size(self, batch: dict) -> int:
        """Examples in a data batch (images, conditions, or the index of a conditions-only batch)."""
        for v in batch.values():
            if isinstance(v, (torch.Tensor, list, tuple)):
                return len(v)
        raise StepdistillError("an empty data batch: the dataset yields no images and no conditions")

    def to(self, device):
        self.pipeline.to(device)
        return self


def check_safetensors(path: Path) -> None:
    """Refuse a pipeline directory whose weights are only pickles (which could run code on load)."""
    if not (path / "model_index.json").is_file():
        raise StepdistillError(
            f"{path} is not a diffusers pipeline directory (no model_index.json). "
            "Pass a directory written by pipeline.save_pretrained(...) or a hub id.")
    model_index(path)
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        files = [f for f in sub.iterdir() if f.is_file()]
        pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        safes = [f.name for f in files if f.suffix == ".safetensors" or f.name.endswith(".safetensors.index.json")]
        if pickles and not safes:
            raise StepdistillError(
                f"teacher component '{sub.name}' in {path} has only pickle weights ({', '.join(pickles)}); "
                "stepdistill loads safetensors only. Convert it once with "
                "`DiffusionPipeline.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` "
                "in an environment you trust, then pass the converted directory.")


def check_whole(path: Path) -> None:
    """Refuse a torn or corrupt safetensors file in a pipeline directory before diffusers tries to read it."""
    from .files import readable_safetensors

    for f in sorted(path.rglob("*.safetensors")):
        if readable_safetensors(f) is None:
            raise StepdistillError(f"{f} is not a whole safetensors file (corrupt or cut short); copy or download "
                                   "it again")


def model_index(path: Path) -> dict:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StepdistillError(f"{path}/model_index.json is not valid JSON ({e}); save the pipeline again with "
                               "save_pretrained") from None
    if not isinstance(index, dict):
        raise StepdistillError(f"{path}/model_index.json should hold a mapping of pipeline components")
    return index


def pipeline_class_for(path: Path):
    """Our own pipeline classes are found in stepdistill; everything else in diffusers."""
    from diffusers import DiffusionPipeline

    from . import pipelines

    name = model_index(path).get("_class_name", "")
    return getattr(pipelines, name, DiffusionPipeline)


def absent_components(path: Path, cls) -> dict:
    """Components the pipeline class takes but the folder saved as absent (e.g. SD3 without T5): passed as None."""
    import diffusers

    index = json.loads((path / "model_index.json").read_text())
    pipe_cls = cls if cls is not diffusers.DiffusionPipeline else getattr(diffusers, index.get("_class_name", ""), None)
    if pipe_cls is None:
        return {}
    expected, _ = pipe_cls._get_signature_keys(pipe_cls)
    return {k: None for k in expected if index.get(k, [None, None]) == [None, None]}


def load_pipeline(source: str, torch_dtype=None):
    """A diffusers pipeline from a local directory or hub id, with safetensors enforced."""
    from diffusers import DiffusionPipeline

    path = Path(source).expanduser()
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") != 1
    if not path.exists() and looks_local:
        raise StepdistillError(f"teacher {source!r} not found: give a pipeline directory that exists or a hub id "
                               "like 'org/name'")
    extra = {}
    if path.exists():
        if path.is_file():
            raise StepdistillError(
                f"{source} is a single file; stepdistill needs a diffusers pipeline directory "
                "(convert single-file checkpoints with DiffusionPipeline.from_single_file(...).save_pretrained(dir)).")
        check_safetensors(path)
        check_whole(path)
        cls = pipeline_class_for(path)
        extra = absent_components(path, cls)
    else:
        cls = DiffusionPipeline
    try:
        return cls.from_pretrained(source, use_safetensors=True, torch_dtype=torch_dtype, **extra)
    except (OSError, ValueError, EnvironmentError) as e:
        raise StepdistillError(f"could not load teacher pipeline {source!r}: {e}") from None


def conditioner_for(pipe) -> Conditioner:
    """The Conditioner matching a pipeline's kind (unconditional, class labels, text)."""
    from . import pipelines

    if isinstance(pipe, pipelines.ClassConditionalPipeline):
        return ClassConditioner(pipe.config.num_classes, pipe.config.null_class)
    name = type(pipe).__name__
    if name == "DiTPipeline":
        model = pipe.transformer
        return ClassConditioner(model.config.num_embeds_ada_norm, model.config.num_embeds_ada_norm)
    if getattr(pipe, "text_encoder", None) is not None:
        from .text import text_conditioner_for  # text-to-image teachers

        return text_conditioner_for(pipe)
    return Conditioner()


def teacher_from_pipeline(pipe, source: str = "<memory>") -> Teacher:
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise StepdistillError(f"{type(pipe).__name__} has neither a unet nor a transformer to distil")
    conditioner = conditioner_for(pipe)
    denoiser = denoiser_for(model, pipe.scheduler.config, conditioner.null())
    vae = getattr(pipe, "vae", None)
    codec = LatentCodec(vae) if vae is not None else PixelCodec()
    for module in (model, vae, getattr(pipe, "text_encoder", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    cfg = model.config
    size = cfg.get("sample_size")
    size = size if isinstance(size, int) else size[0]
    shape = (cfg.get("in_channels"), size, size)
    return Teacher(pipe, denoiser, conditioner, codec, shape, source)


def load_teacher(source: str, torch_dtype=None, vae: str | None = None) -> Teacher:
    """Load a teacher pipeline and wrap it; its networks are frozen. `vae` replaces the pipeline's VAE (and is
    exported with the student), e.g. an fp16-safe one."""
    pipe = load_pipeline(source, torch_dtype)
    if vae is not None:
        if getattr(pipe, "vae", None) is None:
            raise StepdistillError(f"vae = {vae}: the teacher {source} has no VAE to replace; remove the vae key")
        pipe.vae = load_vae(vae, torch_dtype)
    return teacher_from_pipeline(pipe, source)


def load_vae(source: str, torch_dtype=None):
    """An AutoencoderKL from a folder or hub id, safetensors only."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if not path.exists() and (source.startswith(("/", ".", "~")) or source.count("/") != 1):
        raise StepdistillError(f"vae {source!r} not found: give an AutoencoderKL folder or a hub id like 'org/name'")
    if path.exists():
        if not (path / "config.json").is_file():
            raise StepdistillError(f"vae = {source}: not an AutoencoderKL folder (no config.json)")
        check_whole(path)
    try:
        return AutoencoderKL.from_pretrained(source, use_safetensors=True, torch_dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise StepdistillError(f"could not load vae {source!r}: {str(e).splitlines()[0]}") from None


def frozen_dtype(module: nn.Module, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a frozen module runs in under mixed precision: a VAE whose config says it overflows in fp16
    (diffusers' force_upcast, set on the stock SDXL VAE, not on madebyollin/sdxl-vae-fp16-fix) stays fp32."""
    if weight_dtype != torch.float16:
        return weight_dtype
    vaes = [m for m in module.modules() if getattr(getattr(m, "config", None), "get", None) is not None
            and m.config.get("force_upcast", False) and hasattr(m, "decode")]
    return torch.float32 if vaes else weight_dtype
