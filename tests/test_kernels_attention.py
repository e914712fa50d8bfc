"""Triton flash attention vs the pure-torch reference, and its diffusers processors vs the defaults.

The kernels run on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set in conftest)
in fp32 with 16x16 blocks, so the small shapes below still cross block edges, split head dims into
two tiles (40 = 32 + 16 with 8 masked columns, 80 = 64 + 16, 160 = 128 + 32, 8 -> 16 masked), take
the aligned-stride path (strides multiples of 8) and the unaligned one (head dim 20), and mask
ragged (odd) sequence lengths. The backward is the five-product one with dQ added atomically. Tolerances: kernel
(fp32) vs reference (fp64): 2e-5 absolute on outputs and gradients; whole tiny models with the
Triton processor vs diffusers' SDPA processor (both fp32): 1e-4 absolute.
The fp16/bf16 numerics on a GPU are in test_cuda_kernels_fp16_bf16 (marker `cuda`: deselected by default, run with `pytest -m cuda` on a GPU).
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from stepdistill.errors import StepdistillError
from stepdistill.kernels import dispatch
from stepdistill.kernels import attention
from stepdistill.kernels.attention import (FlashAttnProcessor, FlashJointAttnProcessor, attention_reference,
                                           flash_attention)

ATOL = 2e-5
MODEL_ATOL = 1e-4


def _inputs(b, h, lq, lk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q in the processors' layout: a transposed view of (B, L, H, D), not contiguous in (B, H, L, D).
    q = torch.randn(b, lq, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, h, lk, d, generator=g)
    v = torch.randn(b, h, lk, d, generator=g)
    return q, k, v


def _mask(kind, b, h, lq, lk, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool_keys":  # key padding, as a text encoder's attention mask
        m = torch.rand(b, 1, 1, lk, generator=g) > 0.3
        m[..., 0] = True
        return m
    if kind == "additive":  # a full (B, H, Lq, Lk) bias, diffusers' -10000 style entries included
        m = torch.randn(b, h, lq, lk, generator=g)
        m[..., -3:] = -10000.0
        return m
    if kind == "additive_bcast":  # (B, 1, Lk) bias broadcast over heads and queries
        return torch.randn(b, 1, 1, lk, generator=g)
    raise ValueError(kind)


def _grads(fn, q, k, v, mask, go):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, mask)
    out.backward(go)
    return out.detach(), q.grad, k.grad, v.grad


CASES = [  # b, h, lq, lk, d, mask
    (1, 2, 37, 37, 40, None),  # self-attention, head dim 40, ragged last block
    (2, 1, 24, 77, 80, "bool_keys"),  # cross-attention to 77 text tokens, head dim 80
    (1, 2, 20, 9, 32, "additive"),
    (2, 2, 18, 18, 8, "additive_bcast"),  # tiny-model head dim, padded to 16
    (1, 1, 17, 33, 160, None),  # head dim 160 = 128 + 32, no padding
    (1, 1, 16, 16, 64, None),  # exact block multiple
    (1, 1, 19, 21, 64, "bool_keys"),  # head dim 64, odd lengths both sides
    (2, 1, 13, 29, 20, None),  # head dim 20 = 16 + 16 (4 masked), strides not multiples of 8
]


@pytest.mark.parametrize("b,h,lq,lk,d,mask_kind", CASES)
def test_flash_attention_forward_and_grads_match_reference(b, h, lq, lk, d, mask_kind):
    q, k, v = _inputs(b, h, lq, lk, d)
    mask = _mask(mask_kind, b, h, lq, lk)
    go = torch.randn(b, h, lq, d, generator=torch.Generator().manual_seed(2))

    def ref(q, k, v, m):
        m64 = m.double() if m is not None and m.is_floating_point() else m
        return attention_reference(q.double(), k.double(), v.double(), m64)

    out, dq, dk, dv = _grads(flash_attention, q, k, v, mask, go)
    r_out, r_dq, r_dk, r_dv = _grads(ref, q, k, v, mask, go)
    assert out.shape == (b, h, lq, d) and out.dtype == torch.float32
    for name, got, want in (("out", out, r_out), ("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
        torch.testing.assert_close(got.double(), want.double(), atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_flash_attention_fp16_through_the_interpreter():
    """The low-precision path (P cast to fp16 for the second matmul, fp32 accumulation), vs an fp32
    reference: 2e-3 absolute on O(1) values. bf16 cannot be checked here: the interpreter's tl.dot
    mishandles bf16 operands, so bf16 is covered by the CUDA test only."""
    q, k, v = (x.half() for x in _inputs(1, 2, 21, 35, 40))
    mask = _mask("bool_keys", 1, 2, 21, 35)
    go = torch.randn(1, 2, 21, 40, generator=torch.Generator().manual_seed(2)).half()
    got = _grads(flash_attention, q, k, v, mask, go)
    want = _grads(lambda *a: attention_reference(*(x.float() for x in a[:3]), a[3]), q, k, v, mask, go)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.float(), w.float(), atol=2e-3, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_reference_matches_sdpa():
    """The reference is SDPA's math: checks the ground truth itself (fp64, masks of each kind)."""
    q, k, v = (x.double() for x in _inputs(2, 2, 11, 13, 24))
    for kind in (None, "bool_keys", "additive", "additive_bcast"):
        m = _mask(kind, 2, 2, 11, 13)
        m = m.double() if m is not None and m.is_floating_point() else m
        torch.testing.assert_close(attention_reference(q, k, v, m), F.scaled_dot_product_attention(q, k, v, m),
                                   atol=1e-12, rtol=0)


def test_fully_masked_rows_give_zero_and_finite_grads():
    q, k, v = _inputs(2, 1, 5, 20, 16)
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    mask[1] = False  # batch 1 attends to nothing
    go = torch.ones(2, 1, 5, 16)
    out, dq, dk, dv = _grads(flash_attention, q, k, v, mask, go)
    assert torch.all(out[1] == 0)
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    torch.testing.assert_close(out[0], attention_reference(q, k, v)[0], atol=ATOL, rtol=0)


def test_custom_scale_and_errors():
    q, k, v = _inputs(1, 1, 9, 9, 16)
    torch.testing.assert_close(flash_attention(q, k, v, scale=0.3), attention_reference(q, k, v, scale=0.3),
                               atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="head dims up to 256"):
        flash_attention(*_inputs(1, 1, 4, 4, 264))
    with pytest.raises(ValueError, match="no gradient to the mask"):
        flash_attention(q, k, v, torch.zeros(1, 1, 9, 9, requires_grad=True))


def test_head_split_strides_buckets_and_grid_limit():
    assert [attention.head_split(d) for d in (8, 16, 40, 64, 72, 80, 128, 160, 256)] == [
        (16, 0), (16, 0), (32, 16), (64, 0), (64, 16), (64, 16), (128, 0), (128, 32), (256, 0)]
    q, k, v = _inputs(1, 2, 5, 5, 40)
    assert attention.stride_alignment(q, k, v) == 8
    assert attention.stride_alignment(*_inputs(1, 2, 5, 5, 20)) == 1
    assert [attention.length_bucket(n) for n in (1, 64, 65, 77, 1024, 1025, 4429)] == [64, 64, 128, 128, 1024, 2048,
                                                                                      8192]
    attention.check_grid(40_000, 1024, 77)  # batch x heads beyond 65,535 is fine: it is grid axis 0
    with pytest.raises(ValueError, match="65535 blocks"):
        attention.check_grid(1, 65535 * 16 + 1, 8)


def test_batch_heads_go_on_grid_axis_0(monkeypatch):
    """Axis 0 takes 2^31 - 1 programs, axes 1-2 only 65,535: batch x heads must be axis 0."""
    grids = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(attention, "_attn_fwd", Spy(attention._attn_fwd))
    monkeypatch.setattr(attention, "_attn_bwd", Spy(attention._attn_bwd))
    q, k, v = (x.requires_grad_() for x in _inputs(3, 1, 33, 17, 16))
    flash_attention(q, k, v).sum().backward()
    assert grids == [(3, 3), (3, 2)]  # (B*H, query blocks of 16), (B*H, key blocks of 16)


def test_autotune_configs_pruned_by_head_dim():
    def kept(d, backward):
        d0, d1 = attention.head_split(d)
        configs = attention._BWD_CONFIGS if backward else attention._FWD_CONFIGS
        return attention.prune_configs(configs, {}, backward=backward, D0=d0, D1=d1)

    for d in (40, 64, 80, 128, 160, 256):
        for backward in (False, True):
            got = kept(d, backward)
            assert got, (d, backward)
            assert all(attention._smem_estimate(c, sum(attention.head_split(d)), backward) <= attention.SMEM_BUDGET
                       for c in got) or len(got) == 1
    assert len(kept(256, False)) < len(attention._FWD_CONFIGS)  # the 128-row, 3-stage tiles go at 256
    assert len(kept(256, True)) < len(attention._BWD_CONFIGS)
    for backward in (False, True):  # head dims <= 64 keep only the wide tiles
        assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 64 * 32 for c in kept(40, backward))
        assert len(kept(40, backward)) < len(kept(80, backward))


def test_old_triton_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(attention.triton, "__version__", "2.3.1")
    assert "older than 3.0" in attention.triton_problem()
    with pytest.raises(RuntimeError, match="older than 3.0"):
        flash_attention(*_inputs(1, 1, 4, 4, 16))
    with pytest.raises(StepdistillError, match="older than 3.0"):
        dispatch.resolve_backend("triton")


# ----------------------------------------------------------------------------- dispatch


def test_resolve_backend_choices(monkeypatch):
    assert dispatch.resolve_backend("sdpa") == "sdpa"
    assert dispatch.resolve_backend("triton") == "triton"  # runnable here through the interpreter
    if not torch.cuda.is_available():
        assert dispatch.resolve_backend("auto") == "sdpa"  # auto never picks the interpreter
    with pytest.raises(StepdistillError, match="not allowed"):
        dispatch.resolve_backend("flash")
    monkeypatch.setattr(dispatch, "xformers_available", lambda: False)
    with pytest.raises(StepdistillError, match="xformers is not installed"):
        dispatch.resolve_backend("xformers")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch.torch.cuda, "is_available", lambda: False)
    with pytest.raises(StepdistillError, match="no CUDA device"):
        dispatch.resolve_backend("triton")
    monkeypatch.setattr(dispatch, "triton_problem", lambda: "the triton package is not installed")
    with pytest.raises(StepdistillError, match="triton package is not installed"):
        dispatch.resolve_backend("triton")


def test_auto_is_sdpa_until_a_measurement_says_otherwise(monkeypatch):
    """No GPU measurement is recorded: auto is SDPA even where CUDA and Triton are there; an entry for
    this device's capability turns on per-shape routing, which still sends CPU tensors to SDPA."""
    monkeypatch.setattr(dispatch.torch.cuda, "is_available", lambda: True)
    assert dispatch.TRITON_MEASURED_FASTER == frozenset()
    assert dispatch.resolve_backend("auto") == "sdpa"
    monkeypatch.setattr(dispatch.torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(dispatch, "TRITON_MEASURED_FASTER", frozenset({((9, 0), torch.bfloat16, 64)}))
    assert dispatch.resolve_backend("auto") == "auto"
    q, k, v = _inputs(1, 2, 5, 5, 64)
    assert not dispatch.measured_faster(q)  # CPU tensor
    torch.testing.assert_close(dispatch.attend_auto(q, k, v), F.scaled_dot_product_attention(q, k, v))
    monkeypatch.setattr(dispatch.torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert dispatch.resolve_backend("auto") == "sdpa"  # measured on another GPU generation only


def test_triton_supports_routes_unsupported_inputs_to_sdpa():
    q, k, v = _inputs(1, 1, 4, 4, 16)
    assert dispatch.triton_supports(q, k, v)
    assert not dispatch.triton_supports(q.double(), k.double(), v.double())
    assert not dispatch.triton_supports(*_inputs(1, 1, 4, 4, 272))
    assert not dispatch.triton_supports(q, k, v, torch.zeros(1, 1, 4, 4, requires_grad=True))
    q, k, v = _inputs(1, 1, 4, 4, 272)
    torch.testing.assert_close(dispatch.attend_triton(q, k, v), F.scaled_dot_product_attention(q, k, v))


# ----------------------------------------------------------------------------- processors on tiny models


@pytest.fixture
def count_triton_calls(monkeypatch):
    """Counts kernel calls so a processor test cannot pass by silently falling back to SDPA.

    Whole models use 64-wide interpreter blocks (fewer interpreted steps); the kernel tests above
    keep 16 so that they cross block edges.
    """
    monkeypatch.setattr(attention, "INTERPRETER_BLOCK", 64)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return flash_attention(*args, **kwargs)

    monkeypatch.setattr(dispatch, "flash_attention", counted)
    return calls


def _compare_backends(model, forward, grads_of=()):
    """Output (and chosen gradients) of `model` with diffusers' processors vs the Triton ones."""
    ref_model = copy.deepcopy(model)
    used = dispatch.apply_attention_backend(model, "triton")
    assert used == "triton"

    def run(m):
        m.zero_grad()
        torch.manual_seed(0)  # same draws in both runs (DiT's class-label dropout in train mode)
        out = forward(m)
        out = out[0] if isinstance(out, tuple) else out.sample
        out.square().mean().backward()
        params = dict(m.named_parameters())
        return out.detach(), [params[n].grad.clone() for n in grads_of]

    want, want_g = run(ref_model)
    got, got_g = run(model)
    torch.testing.assert_close(got, want, atol=MODEL_ATOL, rtol=0)
    for name, g, w in zip(grads_of, got_g, want_g):
        torch.testing.assert_close(g, w, atol=MODEL_ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    return model


def _processors(model):
    return [type(m.processor) for m in model.modules() if hasattr(m, "processor") and hasattr(m, "to_q")]


def test_unet2d_condition_processor_matches_default(count_triton_calls):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 7, 24)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])  # padded prompt tokens

    def forward(m):
        return m(x, torch.tensor([3, 500]), encoder_hidden_states=ctx, encoder_attention_mask=keep)

    _compare_backends(unet, forward, grads_of=["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                                               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    assert set(_processors(unet)) == {FlashAttnProcessor}
    assert len(count_triton_calls) > 0


def test_unet2d_self_attention_blocks_match_default(count_triton_calls):
    """UNet2DModel's AttnDownBlock2D / mid block: group norm, 4-D input, residual, rescale_output_factor."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                       attention_head_dim=8, norm_num_groups=8)
    for m in unet.modules():  # exercise the non-default rescale that the mid block may carry
        if hasattr(m, "rescale_output_factor"):
            m.rescale_output_factor = 2.0
    x = torch.randn(2, 3, 8, 8)
    _compare_backends(unet, lambda m: m(x, torch.tensor([10, 900])), grads_of=["mid_block.attentions.0.to_v.weight"])
    assert len(count_triton_calls) > 0


def test_dit_transformer2d_processor_matches_default(count_triton_calls):
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    dit = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                             sample_size=8, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10)
    x = torch.randn(2, 4, 8, 8)
    _compare_backends(dit, lambda m: m(x, timestep=torch.tensor([1, 7]), class_labels=torch.tensor([0, 3])),
                      grads_of=["transformer_blocks.0.attn1.to_q.weight"])
    assert set(_processors(dit)) == {FlashAttnProcessor}
    assert len(count_triton_calls) > 0


def test_sd3_joint_processor_matches_default(count_triton_calls):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8,
                                dual_attention_layers=(0,), qk_norm="rms_norm")
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 5, 12)
    pooled = torch.randn(2, 6)

    def forward(m):
        return m(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=torch.tensor([2, 600]))

    _compare_backends(sd3, forward, grads_of=["transformer_blocks.0.attn.add_k_proj.weight",
                                              "transformer_blocks.0.attn2.to_q.weight",
                                              "transformer_blocks.1.attn.to_v.weight"])
    # joint attention and SD3.5's second (self-only) attention, which diffusers also gives the joint processor
    assert set(_processors(sd3)) == {FlashJointAttnProcessor}
    assert len(count_triton_calls) > 0


def test_apply_sdpa_restores_diffusers_processors_and_leaves_others():
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnAddedKVProcessor, AttnProcessor2_0

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    attn.set_processor(AttnAddedKVProcessor())  # a processor we do not replace
    assert dispatch.apply_attention_backend(unet, "triton") == "triton"
    assert type(attn.processor) is AttnAddedKVProcessor
    assert dispatch.apply_attention_backend(unet, "sdpa") == "sdpa"
    kinds = _processors(unet)
    assert FlashAttnProcessor not in kinds and AttnProcessor2_0 in kinds and AttnAddedKVProcessor in kinds


# ----------------------------------------------------------------------------- CUDA only

_CUDA_CHECK = textwrap.dedent("""
    import torch
    from stepdistill.kernels.attention import flash_attention, attention_reference
    torch.manual_seed(0)
    worst = 0.0
    for dtype in (torch.float16, torch.bfloat16):
        for b, h, lq, lk, d, masked in [(2, 8, 1024, 1024, 40, False), (2, 10, 1024, 77, 64, True),
                                        (1, 4, 333, 333, 80, False), (1, 4, 256, 120, 160, True),
                                        (2, 24, 1178, 1178, 64, False), (1, 2, 200, 200, 256, False)]:
            q, k, v = (torch.randn(b, h, l, d, device="cuda", dtype=dtype, requires_grad=True) for l in (lq, lk, lk))
            mask = (torch.rand(b, 1, 1, lk, device="cuda") > 0.2) if masked else None
            go = torch.randn(b, h, lq, d, device="cuda", dtype=dtype)
            out = flash_attention(q, k, v, mask)
            grads = torch.autograd.grad(out, (q, k, v), go)
            q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
            ref = attention_reference(q32, k32, v32, mask)
            rgrads = torch.autograd.grad(ref, (q32, k32, v32), go.float())
            for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *rgrads)):
                err = ((a.float() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
                worst = max(worst, err)
                assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), (dtype, b, h, lq, lk, d, name, err)
    print("worst relative error", worst)
""")


@pytest.mark.cuda
def test_cuda_kernels_fp16_bf16():
    """Compiled kernels (not the interpreter) on a GPU: fp16/bf16 vs an fp32 reference, relative to max |ref|."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _CUDA_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
