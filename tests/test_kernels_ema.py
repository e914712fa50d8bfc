"""Fused (Triton, through the interpreter) and blocked (CPU) multi-rate EMA vs a hand-written
reference and torch._foreach_lerp_, with several rates, bf16 live parameters and refresh.

Tolerance: 1e-6 absolute and relative on fp32 shadows after a few steps (the kernels compute
s + w * (x - s), the reference decay * s + (1 - decay) * x: they differ by an ulp or two).
Small chunk/block sizes make the tiny tensors below cross every chunk and block edge.
The compiled kernel on a GPU is in test_cuda_fused_ema (marker `cuda`: deselected by default, run with `pytest -m cuda` on a GPU).
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from stepdistill.errors import StepdistillError
from stepdistill.kernels.ema import BlockedMultiRateEMA, FusedMultiRateEMA, multi_rate_ema_reference
from stepdistill.training.ema import MultiRateEMA

TOL = dict(atol=1e-6, rtol=1e-6)
DECAYS = [[0.9, 0.5, 0.99], [0.8, 0.95, 0.0], [0.999, 0.7, 0.3]]  # per step; 0.0 copies the live values


def _updaters():
    return {"fused": lambda live, sh: FusedMultiRateEMA(live, sh, chunk=64, block=16),
            "blocked": lambda live, sh: BlockedMultiRateEMA(live, sh, block=48)}


def _live():
    """Mixed sizes and dtypes (two buckets), a channels_last weight and a strided (non-dense) one."""
    g = torch.Generator().manual_seed(0)
    live = [torch.randn(*shape, generator=g).to(dtype) for shape, dtype in [
        ((5, 7), torch.float32), ((1,), torch.float32), ((130,), torch.bfloat16), ((33, 3), torch.bfloat16),
        ((200,), torch.float32), ((17,), torch.bfloat16), ((3, 4, 5, 5), torch.float32)]]
    live[-1] = live[-1].contiguous(memory_format=torch.channels_last)
    live.append(torch.randn(12, 6, generator=g)[:, ::2])  # not dense: updated tensor by tensor
    return [nn.Parameter(p) for p in live]


def _shadows(live, rates, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in live] for _ in range(rates)]


def _perturb(live, step):
    with torch.no_grad():
        for i, p in enumerate(live):
            p.add_(torch.full_like(p, 0.1 * (step + 1) + 0.01 * i))


@pytest.mark.parametrize("kind", ["fused", "blocked"])
def test_matches_reference_and_foreach_bf16_and_fp32(kind):
    live = _live()
    got, ref, fe = _shadows(live, 3), _shadows(live, 3), _shadows(live, 3)
    updater = _updaters()[kind](live, got)
    for step, decays in enumerate(DECAYS):
        updater.step(decays)
        multi_rate_ema_reference(live, ref, decays)
        for rate_shadows, d in zip(fe, decays):
            torch._foreach_lerp_(rate_shadows, [p.detach().float() for p in live], 1 - d)
        for r in range(3):
            for i in range(len(live)):
                torch.testing.assert_close(got[r][i], ref[r][i], **TOL)
                torch.testing.assert_close(got[r][i], fe[r][i], **TOL)
        _perturb(live, step)
    assert got[0][6].is_contiguous(memory_format=torch.channels_last)  # shadows keep the live layout
    assert len(updater.loose) == 1 and len(updater.buckets) == 2


@pytest.mark.parametrize("kind", ["fused", "blocked"])
def test_more_rates_than_one_launch_takes(kind):
    live = _live()[:4]
    got, ref = _shadows(live, 6), _shadows(live, 6)
    decays = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    _updaters()[kind](live, got).step(decays)
    multi_rate_ema_reference(live, ref, decays)
    for r in range(6):
        for i in range(4):
            torch.testing.assert_close(got[r][i], ref[r][i], **TOL)


@pytest.mark.parametrize("kind", ["fused", "blocked"])
def test_refresh_after_shadow_replaced_and_live_moved(kind):
    live = _live()
    got, ref = _shadows(live, 2), _shadows(live, 2)
    updater = _updaters()[kind](live, got)
    updater.step([0.5, 0.9])
    multi_rate_ema_reference(live, ref, [0.5, 0.9])
    # a checkpoint load that replaces tensors instead of copying into them, then refresh()
    loaded = [[t.detach().clone() + 1.0 for t in rs] for rs in ref]
    for rs_got, rs_ref, rs_new in zip(got, ref, loaded):
        for g, r, n in zip(rs_got, rs_ref, rs_new):
            g.data = n.clone()
            r.copy_(n)
    updater.refresh()
    # a live parameter whose storage moved (e.g. re-assigned .data): picked up without refresh()
    live[2].data = live[2].data.clone()
    live[0].data = live[0].data.clone()
    _perturb(live, 0)
    updater.step([0.3, 0.8])
    multi_rate_ema_reference(live, ref, [0.3, 0.8])
    for r in range(2):
        for i in range(len(live)):
            torch.testing.assert_close(got[r][i], ref[r][i], **TOL)


def _module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 5))
    m[0].weight.requires_grad_(False)  # frozen: shared with the live module, never averaged
    return m


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_multirate_ema_backends_agree_with_foreach_through_training(backend, tmp_path):
    """MultiRateEMA with the kernels (fused via the interpreter; auto = blocked on CPU) vs foreach,
    over optimizer steps with warm-up decays, a state_dict round trip and a safetensors save."""
    from safetensors.torch import load_file, save_file

    model = _module().to(torch.bfloat16 if backend == "auto" else torch.float32)
    twin = copy.deepcopy(model)
    rates = {"ema_0.99": 0.99, "target": 0.5, "slow": 0.999}
    ema = MultiRateEMA(model, rates, backend=backend, warmup=True)
    base = MultiRateEMA(twin, rates, backend="foreach", warmup=True)
    kind = FusedMultiRateEMA if backend == "fused" else BlockedMultiRateEMA
    assert isinstance(ema._fused, kind) and base._fused is None
    x = torch.randn(2, 3, 8, 8, dtype=next(model.parameters()).dtype)
    for m, e in ((model, ema), (twin, base)):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            m(x).float().square().mean().backward()
            opt.step()
            e.update()
    for name in rates:
        for (n, a), (_, b) in zip(ema.module(name).named_parameters(), base.module(name).named_parameters()):
            torch.testing.assert_close(a, b, **TOL, msg=lambda msg, n=n: f"{name}/{n}: {msg}")
        if backend == "fused":  # fp32 model: the shadow module computes with the averaged weights
            torch.testing.assert_close(ema.module(name)(x.float()), base.module(name)(x.float()), atol=1e-5, rtol=1e-5)
    assert ema.module("target")[0].weight is model[0].weight

    sd = ema.state_dict()
    save_file(sd, str(tmp_path / "ema.safetensors"))  # packed shadows still save
    ema.update()
    ema.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))
    base.load_state_dict(sd)
    for e in (ema, base):
        e.update()
    for name in rates:
        for a, b in zip(ema.shadow_params[name], base.shadow_params[name]):
            torch.testing.assert_close(a, b, **TOL)


def test_packed_shadow_module_saves_and_loads_with_diffusers(tmp_path):
    """Shadows re-pointed into flat rows must still export as a diffusers model (the student export)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    ema = MultiRateEMA(unet, {"ema": 0.9}, backend="auto")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    ema.update()
    ema.module("ema").save_pretrained(tmp_path / "ema")
    loaded = UNet2DModel.from_pretrained(tmp_path / "ema")
    for (n, a), (_, b) in zip(ema.module("ema").named_parameters(), loaded.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


def test_fused_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    live = _live()[:2]
    with pytest.raises(StepdistillError, match="kernels.ema = 'fused' needs the parameters on a CUDA device"):
        FusedMultiRateEMA(live, _shadows(live, 1))


def test_rejects_mismatched_shadows():
    live = _live()[:2]
    with pytest.raises(ValueError, match="fp32 tensor shaped"):
        BlockedMultiRateEMA(live, [[torch.zeros(3), torch.zeros(1)]])
    with pytest.raises(ValueError, match="one shadow per live"):
        BlockedMultiRateEMA(live, [[torch.zeros(5, 7)]])


_CUDA_CHECK = textwrap.dedent("""
    import torch
    from stepdistill.kernels.ema import FusedMultiRateEMA, multi_rate_ema_reference
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [1, 7, 320, 4096, 8191, 8192, 8193, 1_000_003, 320 * 320 * 9]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        live = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in sizes]
        got = [[torch.randn(n, device="cuda", generator=g) for n in sizes] for _ in range(5)]
        ref = [[t.clone() for t in rs] for rs in got]
        ema = FusedMultiRateEMA(live, got)
        for decays in ([0.9, 0.99, 0.999, 0.5, 0.1], [0.0, 0.3, 0.6, 0.9, 0.99]):
            ema.step(decays)
            multi_rate_ema_reference(live, ref, decays)
        for rs_g, rs_r in zip(got, ref):
            for a, b in zip(rs_g, rs_r):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    print("ok")
""")


@pytest.mark.cuda
def test_cuda_fused_ema():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _CUDA_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
