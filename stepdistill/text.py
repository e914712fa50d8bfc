"""Text conditioning for text-to-image teachers: prompts -> the keyword arguments the network takes.

Each family calls its pipeline's own `encode_prompt`, so training sees exactly the embeddings that
plain diffusers computes at inference:

- SD1.5 (StableDiffusionPipeline, LatentConsistencyModelPipeline): `encoder_hidden_states`;
- SDXL (StableDiffusionXLPipeline): two CLIP encoders, `encoder_hidden_states` plus
  `added_cond_kwargs = {"text_embeds": pooled, "time_ids": (H, W, 0, 0, H, W)}`; the null condition is
  all zeros when the pipeline sets `force_zeros_for_empty_prompt` (as SDXL's pipeline and LCM-LoRA do);
- SD3 (StableDiffusion3Pipeline): CLIP-L, CLIP-G and optional T5, `encoder_hidden_states` plus
  `pooled_projections`.

Embeddings are cached per prompt (in memory; `precompute_text_embeddings` writes them to a
safetensors file that `data.text_embeddings` loads), so each caption runs the encoders once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .conditioning import Conditioner
from .errors import StepdistillError

EXAMPLE_PROMPTS = ["a photograph of an astronaut riding a horse", "a red apple on a wooden table",
                   "a watercolor painting of a lighthouse", "a cat wearing a hat"]


def _map(fn, tree):
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: dict[str, torch.Tensor]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _stack(items: list[dict]) -> dict:
    first = items[0]
    return {k: _stack([it[k] for it in items]) if isinstance(v, dict) else torch.cat([it[k] for it in items])
            for k, v in first.items()}


class TextConditioner(Conditioner):
    """Prompts (`batch["prompt"]`, a list of strings) -> model kwargs, with a per-prompt cache."""

    kind = "text"

    def __init__(self, pipe, cache: bool = True):
        self.pipe = pipe
        self.cache_enabled = cache
        self.cache: dict[str, dict] = {}  # prompt -> batch-1 kwargs on the CPU
        self._null = None

    # -- what each family defines --------------------------------------------------------------
    def _encode(self, prompts: list[str], device) -> dict:
        raise NotImplementedError

    def _null_kwargs(self) -> dict:
        return self._encode([""], self._encoder_device())

    # -- shared --------------------------------------------------------------------------------
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if m is not None]

    def _encoder_device(self):
        encoders = self.text_encoders()
        return next(encoders[0].parameters()).device if encoders else torch.device("cpu")

    def _move_encoders(self, device) -> None:
        device = torch.device(device)
        for m in self.text_encoders():
            if next(m.parameters()).device != device:
                m.to(device)

    def prepare(self, data_config) -> None:
        self.cache_enabled = data_config.cache_text_embeddings
        path = getattr(data_config, "text_embeddings", None)
        if path:
            self.load(path)

    @torch.no_grad()
    def encode(self, batch: dict, device) -> dict:
        prompts = batch["prompt"]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.cache_enabled:
            self._move_encoders(device)
            return _map(lambda t: t.to(device), self._encode(prompts, device))
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            self._move_encoders(device)
        for p in missing:  # one prompt per call: its embedding does not depend on which batch first held it
            self.cache[p] = _map(lambda t: t.detach().cpu(), self._encode([p], device))  # (bit-exact resume)
        return _map(lambda t: t.to(device), _stack([self.cache[p] for p in prompts]))

    def null(self) -> dict:
        """The empty prompt's kwargs, batch 1, on the CPU (classifier-free guidance's unconditional half)."""
        if self._null is None:
            with torch.no_grad():
                self._null = _map(lambda t: t.detach().cpu(), self._null_kwargs())
        return self._null

    def batch_size(self, batch: dict) -> int:
        return len(batch["prompt"])

    def example_conditions(self, n: int) -> dict:
        return {"prompt": [EXAMPLE_PROMPTS[i % len(EXAMPLE_PROMPTS)] for i in range(n)]}

    # -- precomputed embeddings ------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the cached embeddings to one safetensors file (prompts in its metadata)."""
        from safetensors.torch import save_file

        prompts = sorted(self.cache)
        tensors = {f"{i}/{k}": v.contiguous() for i, p in enumerate(prompts) for k, v in _flatten(self.cache[p]).items()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"prompts": json.dumps(prompts), "conditioner": type(self).__name__})
        return path

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StepdistillError(f"data.text_embeddings = {path}: file not found; write it with "
                                   "stepdistill.text.precompute_text_embeddings(teacher, prompts, path)")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("conditioner") != type(self).__name__:
                raise StepdistillError(f"{path} holds embeddings of a {meta.get('conditioner')} teacher, "
                                       f"not of this {type(self).__name__} teacher")
            prompts = json.loads(meta["prompts"])
            per: dict[int, dict] = {}
            for key in f.keys():
                i, rest = key.split("/", 1)
                per.setdefault(int(i), {})[rest] = f.get_tensor(key)
        for i, p in enumerate(prompts):
            self.cache[p] = _unflatten(per[i])


class SD15TextConditioner(TextConditioner):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, `encoder_hidden_states`."""

    def _encode(self, prompts, device):
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}


class SDXLTextConditioner(TextConditioner):
    """SDXL: two CLIP encoders; pooled embedding and size/crop ids in `added_cond_kwargs`."""

    def _time_ids(self, n: int, dtype) -> torch.Tensor:
        pipe = self.pipe
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        proj = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else None)
        ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=dtype, text_encoder_projection_dim=proj)
        return ids.repeat(n, 1)

    def _encode(self, prompts, device):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self._time_ids(len(prompts), embeds.dtype).to(device)}}

    def _null_kwargs(self):
        kwargs = self._encode([""], self._encoder_device())
        if self.pipe.config.get("force_zeros_for_empty_prompt", True):
            kwargs["encoder_hidden_states"] = torch.zeros_like(kwargs["encoder_hidden_states"])
            kwargs["added_cond_kwargs"]["text_embeds"] = torch.zeros_like(kwargs["added_cond_kwargs"]["text_embeds"])
        return kwargs


class SD3TextConditioner(TextConditioner):
    """SD3: CLIP-L + CLIP-G (+ T5 when present, zeros otherwise); `pooled_projections`."""

    def _encode(self, prompts, device):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


CONDITIONERS = {
    "StableDiffusionPipeline": SD15TextConditioner,
    "LatentConsistencyModelPipeline": SD15TextConditioner,
    "StableDiffusionXLPipeline": SDXLTextConditioner,
    "StableDiffusion3Pipeline": SD3TextConditioner,
}


def text_conditioner_for(pipe) -> TextConditioner:
    """The Conditioner (kind "text") for a text-to-image pipeline."""
    name = type(pipe).__name__
    if name not in CONDITIONERS:
        raise StepdistillError(f"text-to-image pipeline {name} is not supported yet; supported: {', '.join(CONDITIONERS)}")
    return CONDITIONERS[name](pipe)


def precompute_text_embeddings(teacher, prompts: list[str], path: str | Path, device="cpu",
                               batch_size: int = 64) -> Path:
    """Encode `prompts` once with the teacher's text encoders and save them for `data.text_embeddings`."""
    cond = teacher.conditioner
    if not isinstance(cond, TextConditioner):
        raise StepdistillError("precomputed text embeddings need a text-to-image teacher")
    cond.cache_enabled = True
    for i in range(0, len(prompts), batch_size):
        cond.encode({"prompt": prompts[i:i + batch_size]}, device)
    return cond.save(path)
