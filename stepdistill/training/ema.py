"""Exponential moving averages of a student at several rates, updated together.

Each rate keeps an fp32 shadow copy of the module's trainable parameters; frozen parameters
(the base of a LoRA student) are shared with the live module, not copied. A shadow is a
whole nn.Module, so a consistency target network is simply the shadow at its rate.
All rates are updated in one call after each optimizer step: by a fused Triton kernel on
CUDA when available, by a cache-blocked multi-rate lerp on CPU (both in stepdistill.kernels.ema),
or by torch._foreach_lerp_ per rate (kernels.ema=foreach).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_name(decay: float) -> str:
    return f"ema_{decay:g}"


class MultiRateEMA:
    """Shadow modules of `module` at named decay rates, e.g. {"ema_0.9999": 0.9999, "target": 0.95}."""

    def __init__(self, module: nn.Module, rates: dict[str, float], backend: str = "auto", warmup: bool = False):
        self.rates = dict(rates)
        self.warmup = warmup
        self.num_updates = 0
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.live = [p for p in module.parameters() if p.requires_grad]
        frozen = {id(p): p for p in module.parameters() if not p.requires_grad}
        self.shadows: dict[str, nn.Module] = {}
        for name in self.rates:
            shadow = copy.deepcopy(module, memo=dict(frozen))  # frozen weights shared, trainable ones copied
            for p in shadow.parameters():
                if id(p) not in frozen:
                    p.data = p.data.float()
                p.requires_grad_(False)
            self.shadows[name] = shadow.eval()
        self.shadow_params = {name: [dict(s.named_parameters())[n] for n in self.names]
                              for name, s in self.shadows.items()}
        self._fused = self._make_fused(backend)

    def _make_fused(self, backend: str):
        """The kernel updater: Triton where asked for (or 'auto' on CUDA), the blocked CPU path for
        'auto' on CPU (faster than foreach, see benchmarks/RESULTS.md); None means foreach."""
        if backend == "foreach" or not self.rates or not self.live:
            return None
        from ..kernels.ema import BlockedMultiRateEMA, FusedMultiRateEMA, triton_problem

        shadows = [self.shadow_params[n] for n in self.rates]
        if backend == "fused" or (self.live[0].is_cuda and triton_problem() is None):
            return FusedMultiRateEMA(self.live, shadows)
        if self.live[0].device.type == "cpu":
            return BlockedMultiRateEMA(self.live, shadows)
        return None

    def decay(self, name: str) -> float:
        d = self.rates[name]
        if self.warmup:
            d = min(d, (1 + self.num_updates) / (10 + self.num_updates))
        return d

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow toward the live weights: shadow <- decay * shadow + (1 - decay) * live."""
        decays = [self.decay(n) for n in self.rates]
        if self._fused is not None:
            self._fused.step(decays)
        else:
            live = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in self.live]
            for name, d in zip(self.rates, decays):
                torch._foreach_lerp_(self.shadow_params[name], live, 1.0 - d)
        self.num_updates += 1

    def module(self, name: str) -> nn.Module:
        return self.shadows[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"{rate}/{n}": p.detach().cpu().contiguous() for rate, ps in self.shadow_params.items()
              for n, p in zip(self.names, ps)}
        sd["num_updates"] = torch.tensor(self.num_updates)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for rate, ps in self.shadow_params.items():
            for n, p in zip(self.names, ps):
                p.data.copy_(sd[f"{rate}/{n}"])
        self.num_updates = int(sd["num_updates"])
        if self._fused is not None:
            self._fused.refresh()

    @torch.no_grad()
    def copy_to(self, name: str, module: nn.Module) -> None:
        """Write a shadow's weights into `module` (same architecture), in the module's dtype."""
        params = dict(module.named_parameters())
        for n, p in zip(self.names, self.shadow_params[name]):
            params[n].data.copy_(p.to(params[n].dtype))


class EMASet:
    """The EMAs of every exported network: one MultiRateEMA per network, each at its own named rates.

    The run's `train.ema_decays` apply to every exported network; a method adds its own rates per
    network (a consistency target). Shadows are looked up as `ema.module(network, rate)`."""

    def __init__(self, networks: dict[str, nn.Module], rates: dict[str, dict[str, float]], backend: str = "auto",
                 warmup: bool = False):
        self.emas = {name: MultiRateEMA(net, rates[name], backend=backend, warmup=warmup)
                     for name, net in networks.items() if rates.get(name)}

    def __bool__(self) -> bool:
        return bool(self.emas)

    def rates(self, network: str) -> dict[str, float]:
        return self.emas[network].rates if network in self.emas else {}

    def module(self, network: str, rate: str) -> nn.Module:
        return self.emas[network].module(rate)

    def update(self, skip=()) -> None:
        """Update every network's EMAs but those in `skip` (networks whose optimizer step was skipped)."""
        for name, ema in self.emas.items():
            if name not in skip:
                ema.update()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{net}/{k}": v for net, ema in self.emas.items() for k, v in ema.state_dict().items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for net, ema in self.emas.items():
            prefix = f"{net}/"
            ema.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
