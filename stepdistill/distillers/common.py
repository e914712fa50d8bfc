"""Pieces several methods share: building the student network.

A student is the teacher's network copied (optionally with config changes such as a new guidance input,
which start at zero so the student starts as the teacher), or a network of another size given as config
changes (fewer channels or blocks: SlimFlow, multi-student distillation), initialised from scratch.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import option
from ..errors import ConfigError


@dataclass
class StudentArchitecture:
    """The `distill.student` section of methods that may train a student of another architecture."""

    changes: dict = option({}, "config changes from the teacher's network, e.g. {block_out_channels: [16, 32, 32], "
                               "layers_per_block: 1}; empty: the teacher's architecture")
    init: Literal["teacher", "scratch"] = option(
        "teacher", "teacher: start from the teacher's weights (every weight must fit); scratch: random initialisation")


def copy_student(model: nn.Module, **config_changes) -> nn.Module:
    """A trainable fp32 copy of the teacher network, optionally with config changes (new inputs start at zero)."""
    if not config_changes:
        student = copy.deepcopy(model)
    else:
        student = _from_changed_config(model, config_changes)
        missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
        if unexpected:
            raise ConfigError(f"teacher weights do not fit the student: unexpected keys {unexpected[:3]}")
        with torch.no_grad():
            for name, p in student.named_parameters():
                if name in missing:
                    p.zero_()
    return student.float().requires_grad_(True).train()


def build_student(model: nn.Module, arch: StudentArchitecture, where: str = "distill.student") -> nn.Module:
    """The student `arch` describes: the teacher's copy (init teacher) or a fresh network (init scratch)."""
    if arch.init == "teacher":
        if arch.changes:
            mismatched = _shape_changes(model, arch.changes)
            if mismatched:
                name, old, new = mismatched[0]
                raise ConfigError(f"{where}.changes alter the shape of {len(mismatched)} teacher weights (e.g. {name}: "
                                  f"{tuple(old)} -> {tuple(new)}), so the student cannot start from the teacher; "
                                  f"set {where}.init: scratch")
        return copy_student(model, **arch.changes)
    return _from_changed_config(model, arch.changes).float().requires_grad_(True).train()


def _from_changed_config(model: nn.Module, changes: dict) -> nn.Module:
    params = inspect.signature(type(model).__init__).parameters
    bad = [k for k in changes if k not in params]
    if bad:
        raise ConfigError(f"{type(model).__name__} has no config option {bad[0]!r}; valid options include "
                          f"{', '.join(sorted(p for p in params if p not in ('self', 'args', 'kwargs'))[:12])}, ...")
    try:
        return type(model).from_config({**model.config, **changes})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"the student config changes {changes} do not build a {type(model).__name__}: {e}") from None


def _shape_changes(model: nn.Module, changes: dict) -> list[tuple[str, torch.Size, torch.Size]]:
    with torch.device("meta"):
        probe = _from_changed_config(model, changes)
    theirs = model.state_dict()
    return [(k, theirs[k].shape, v.shape) for k, v in probe.state_dict().items() if k in theirs
            and theirs[k].shape != v.shape]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
