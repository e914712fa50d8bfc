"""LoRA students through peft: add adapters to a copy of the teacher network, and turn them back
into what plain diffusers loads (a `load_lora_weights` folder, or weights merged into the network).

A LoRA student trains only the adapter matrices; its frozen base weights are shared with the
EMA shadows (training/ema.py), so a consistency target network costs two small matrices per layer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, StepdistillError

# LCM-LoRA's target modules for UNet2DConditionModel (diffusers examples/consistency_distillation,
# train_lcm_distill_lora_sd_wds.py); names that a network lacks are skipped.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, target_modules: list[str] | None = None,
             dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters (B initialised to zero, so the student starts as the teacher); only they train."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(target_modules or UNET_TARGETS)
    names = [n for n, _ in model.named_modules()]
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ConfigError(f"distill.lora_target_modules {targets} match no layer of {type(model).__name__}; "
                          "name its linear/conv layers, e.g. to_q, to_k, to_v, to_out.0")
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=present,
                        lora_dropout=dropout)
    inject_adapter_in_model(config, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's naming (`...to_q.lora_A.weight`), as diffusers' save_lora_weights takes them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def lora_metadata(model: nn.Module) -> dict:
    """The LoraConfig as a dict (rank, alpha, targets): diffusers stores it so that load_lora_weights scales correctly."""
    cfg = model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRA adapter merged into its base layer and the peft wrappers removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    if hasattr(merged, "_hf_peft_config_loaded"):
        merged._hf_peft_config_loaded = False
    return merged


def save_lora(pipeline_class, model_key: str, model: nn.Module, out_dir: str | Path) -> Path:
    """Write the adapters so that `pipe.load_lora_weights(out_dir)` (and then `pipe.fuse_lora()`) works in diffusers."""
    saver = getattr(pipeline_class, "save_lora_weights", None)
    if saver is None:
        raise StepdistillError(f"{pipeline_class.__name__} has no LoRA loader in diffusers, so its LoRA cannot be "
                               "exported alone; set export.lora_only=false to write the merged pipeline")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.float() for k, v in lora_state_dict(model).items()}
    kwargs = {f"{model_key}_lora_layers": state}
    try:
        pipeline_class.save_lora_weights(out_dir, **kwargs, **{f"{model_key}_lora_adapter_metadata": lora_metadata(model)},
                                         safe_serialization=True)
    except TypeError:  # a diffusers without adapter metadata assumes alpha = rank when loading
        cfg = model.peft_config["default"]
        if cfg.lora_alpha != cfg.r:
            raise StepdistillError(f"this diffusers cannot store LoRA alpha ({cfg.lora_alpha}) != rank ({cfg.r}); "
                                   "upgrade diffusers or train with distill.lora_alpha equal to the rank") from None
        pipeline_class.save_lora_weights(out_dir, **kwargs, safe_serialization=True)
    return out_dir
