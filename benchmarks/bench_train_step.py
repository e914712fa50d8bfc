"""Training step time and peak memory of the landed methods (cd, lcm, progressive) against a baseline loop
written as diffusers' LCM example is (examples/consistency_distillation/train_lcm_distill_sd_wds.py): one
loop, the teacher UNet called directly (a conditional and an unconditional call), a DDIM solver step, the
target UNet driven by diffusers' EMAModel, plain torch.optim.AdamW, `loss.item()` logged every step.

  python benchmarks/bench_train_step.py                                  # CPU: the digits world, small
  python benchmarks/bench_train_step.py --arch sd15 --batch 4            # GPU: SD1.5 UNet, random weights
  python benchmarks/bench_train_step.py --arch sdxl --batch 2 --methods lcm

Same model, batch and precision in every row of one run: the student is the method's own student network
(for lcm with its w-embedding), the baseline trains a copy of it; mixed precision is fp16 on CUDA, none on
CPU. Architectures: `digits` (the embedded class-conditional teacher, 1x16x16, CPU-sized); `sd15` and
`sdxl` (UNet2DConditionModel at the configs of stable-diffusion-v1-5 and SDXL-base, random weights, no
download, with two-layer CLIP text encoders of the right widths and a tiny VAE, latents 64x64 / 128x128)
trained data-free on prompts. Each (method) runs in its own process so that peak memory is its own (CUDA:
max_memory_allocated; CPU: the peak resident set above the start, as benchmarks/bench_lcm_lora.py).
Prints the median step time over --steps after --warmup, peak memory, and method / baseline ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_lcm_lora import _status, reset_peak_rss  # noqa: E402

CONFIGS = {"cd": "digits/consistency.yaml", "lcm": "digits/lcm.yaml", "progressive": "digits/progressive.yaml"}

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def text_teacher(arch: str, tmp: Path) -> Path:
    """An SD1.5 / SDXL pipeline at the real UNet size with random weights (tiny CLIP and VAE), saved to tmp."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    import tiny_models as tm

    tok = tm.tiny_tokenizer(tmp / "tok")
    torch.manual_seed(0)
    if arch == "sd15":
        unet = UNet2DConditionModel(**SD15_UNET)
        pipe = StableDiffusionPipeline(vae=tm.tiny_vae(), text_encoder=tm.tiny_clip(len(tok), 768), tokenizer=tok,
                                       unet=unet, scheduler=tm.sd15_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        unet = UNet2DConditionModel(**SDXL_UNET)
        pipe = StableDiffusionXLPipeline(vae=tm.tiny_vae(), text_encoder=tm.tiny_clip(len(tok), 768),
                                         text_encoder_2=tm.tiny_clip(len(tok), 1280, projection=1280, seed=1),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=tm.sd15_scheduler(),
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(tmp / arch)
    return tmp / arch


def setup(arch: str, method: str, batch: int):
    """(config, teacher, distiller, dataset) of `method` on `arch`, mixed precision fp16 on CUDA."""
    import torch

    import tiny_models as tm
    from stepdistill.config import load_config
    from stepdistill.paths import CONFIGS as CONFIG_DIR
    from stepdistill.runner import build

    tmp = Path(tempfile.mkdtemp())
    overrides = [f"output_dir={tmp / 'run'}", f"train.batch_size={batch}", "train.report_to=none",
                 "train.progress_bar=false", "train.mixed_precision=" + ("fp16" if torch.cuda.is_available() else "'no'")]
    if arch != "digits":
        prompts = tm.write_prompt_file(tmp / "prompts.txt")
        res = SD15_UNET["sample_size"] * 2 if arch == "sd15" else SDXL_UNET["sample_size"] * 2
        overrides += [f"teacher={text_teacher(arch, tmp)}", "data.dataset=prompts", f"data.path={prompts}",
                      f"data.resolution={res}"]
    else:
        overrides.append(f"teacher={ROOT / 'samples' / 'digits-teacher'}")
    if method == "progressive":
        overrides.append("distill.round=1")  # one round (64 -> 32 teacher steps) is one training run
    cfg = load_config(CONFIG_DIR / CONFIGS[method], overrides)
    teacher, distiller, dataset = build(cfg)
    return cfg, teacher, distiller, dataset


def x0_eps(pred, x, a, s, kind: str):
    """(x0, eps) from a VP network output of prediction type `kind` at x_t = a x0 + s eps."""
    if kind == "epsilon":
        return (x - s * pred) / a, pred
    if kind == "v_prediction":
        return a * x - s * pred, s * x + a * pred
    return pred, (x - a * pred) / s


def baseline_steps(cfg, teacher, distiller, dataset, steps: int, warmup: int):
    """The diffusers-example loop on the method's student architecture; returns per-step seconds."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from stepdistill.conditioning import guidance_embedding
    from stepdistill.training.data import batch_iterator

    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    dev = acc.device
    student_net = next(iter(distiller.trainable_networks().values()))
    unet = copy.deepcopy(student_net).train().requires_grad_(True)
    teacher_unet = teacher.model.to(dev).requires_grad_(False)
    target_unet = copy.deepcopy(unet).requires_grad_(False)
    ema = EMAModel(unet.parameters(), decay=0.95)
    ema.shadow_params = [p.data for p in target_unet.parameters()]  # EMAModel steps the target UNet's weights
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.0)
    unet, opt = acc.prepare(unet, opt)
    target_unet.to(dev)
    sched = teacher.pipeline.scheduler
    kind = sched.config.prediction_type
    abar = sched.alphas_cumprod.to(dev)
    n_ddim, k = 50, sched.config.num_train_timesteps // 50
    null = teacher.conditioner.null()
    w_dim = getattr(student_net.config, "time_cond_proj_dim", None)
    w_min = getattr(distiller.config, "guidance_scale_min", 1.0)
    w_max = getattr(distiller.config, "guidance_scale_max", 1.0)
    data = batch_iterator(dataset, cfg.train.batch_size, cfg.seed, 0, 0, 1)

    def scalings(t):
        t = t.float() * 10.0  # timestep_scaling 10
        c_skip = 0.25 / (t ** 2 + 0.25)
        return c_skip, t / (t ** 2 + 0.25) ** 0.5

    times = []
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        batch = next(data)
        x0, cond = teacher.encode_batch(batch, dev)
        cond.setdefault("encoder_hidden_states", None)  # class-conditional UNet2DConditionModels take None
        n = teacher.batch_size(batch)
        if x0 is None:
            x0 = torch.randn(n, *teacher.sample_shape, device=dev)
        idx = torch.randint(0, n_ddim, (n,), device=dev)
        t = (idx + 1) * k - 1
        t_prev = (t - k).clamp_min(0)
        noise = torch.randn_like(x0)
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        a_p, s_p = abar[t_prev].sqrt().view(-1, 1, 1, 1), (1 - abar[t_prev]).sqrt().view(-1, 1, 1, 1)
        x_t = a * x0 + s * noise
        w = w_min + (w_max - w_min) * torch.rand(n, device=dev)
        extra = {"timestep_cond": guidance_embedding(w, w_dim)} if w_dim else {}
        c_skip, c_out = (c.view(-1, 1, 1, 1) for c in scalings(t))
        with acc.autocast():
            pred = unet(x_t, t, **cond, **extra).sample
            model_pred = c_skip * x_t + c_out * x0_eps(pred, x_t, a, s, kind)[0]
            with torch.no_grad():
                c_pred = teacher_unet(x_t, t, **cond).sample
                x0_c, eps_c = x0_eps(c_pred, x_t, a, s, kind)
                if null is not None and w_max > 1.0:
                    u_cond = {key: v.to(dev).expand(n, *v.shape[1:]) for key, v in null.items()}
                    u_pred = teacher_unet(x_t, t, **{**cond, **u_cond}).sample
                    x0_u, eps_u = x0_eps(u_pred, x_t, a, s, kind)
                    wv = w.view(-1, 1, 1, 1)
                    x0_c, eps_c = x0_u + wv * (x0_c - x0_u), eps_u + wv * (eps_c - eps_u)
                x_prev = a_p * x0_c + s_p * eps_c
                tp_pred = target_unet(x_prev, t_prev, **cond, **extra).sample
                cs_p, co_p = (c.view(-1, 1, 1, 1) for c in scalings(t_prev))
                target = cs_p * x_prev + co_p * x0_eps(tp_pred, x_prev, a_p, s_p, kind)[0]
            loss = (torch.sqrt((model_pred.float() - target.float()) ** 2 + 0.001 ** 2) - 0.001).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(acc.unwrap_model(unet).parameters())
        logs = {"loss": loss.detach().item()}  # the example's per-step log (a host sync)
        del logs
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times, sum(p.numel() for p in unet.parameters())


def method_steps(cfg, distiller, dataset, steps: int, warmup: int):
    """The trainer's own step (update plan, loss, backward, clip, AdamW, EMA) without its logging or saving."""
    import torch

    from stepdistill.training.data import batch_iterator
    from stepdistill.training.trainer import LogBuffer, Trainer

    if os.environ.get("BENCH_NO_FUSED_ADAMW"):  # --no-fused-adamw: measure what the fused optimizer buys
        import stepdistill.training.trainer as trainer_module

        trainer_module.fused_adamw = lambda params: None
    trainer = Trainer(distiller, dataset, cfg)
    data = batch_iterator(dataset, cfg.train.batch_size, cfg.seed, 0, 0, 1)
    logs = LogBuffer()
    times = []
    distiller.train()
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        batches = [next(data)]
        for name in distiller.update_plan(trainer.step):
            trainer.update(name, batches, logs)
        for s in trainer.schedulers.values():
            s.step()
        if trainer.ema is not None:
            trainer.ema.update()
        trainer.step += 1
        if trainer.step % cfg.train.log_every == 0:
            logs.pop_means()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for ps in trainer.params.values() for _, p in ps)
    return times, params


def measure(arch: str, method: str, baseline: bool, steps: int, warmup: int, batch: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    cfg, teacher, distiller, dataset = setup(arch, method, batch)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    if baseline:
        times, params = baseline_steps(cfg, teacher, distiller, dataset, steps, warmup)
    else:
        times, params = method_steps(cfg, distiller, dataset, steps, warmup)
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    return {"arch": arch, "method": method, "row": "baseline (diffusers LCM example loop)" if baseline else method,
            "device": "cuda" if cuda else "cpu", "step_s": statistics.median(times), "peak_bytes": peak - base,
            "trainable": params}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="digits", choices=["digits", "sd15", "sdxl"])
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in each child (0: torch's default)")
    p.add_argument("--no-fused-adamw", action="store_true", help="the methods with torch's default (foreach) AdamW")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "BASELINE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        method, baseline = args.child[0], args.child[1] == "1"
        print(json.dumps(measure(args.arch, method, baseline, args.steps, args.warmup, args.batch, args.threads)))
        return
    rows = []
    for method in args.methods:
        for baseline in (True, False):  # the baseline on the method's student network, then the method
            out = subprocess.run([sys.executable, __file__, "--child", method, str(int(baseline)), "--arch", args.arch,
                                  "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                                  "--threads", str(args.threads)], capture_output=True, text=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
                                      **({"BENCH_NO_FUSED_ADAMW": "1"} if args.no_fused_adamw else {})})
            if out.returncode:
                sys.exit(f"{method} (baseline={baseline}) failed:\n{out.stderr[-4000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"measured {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print(f"\n{args.arch}, batch {args.batch}, {rows[0]['device']}, median of {args.steps} steps after {args.warmup}\n")
    print("| method | row | trainable params | step | peak memory (above start) | step ratio (baseline / row) "
          "| memory ratio (row / baseline) |")
    print("|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        base, row = rows[i], rows[i + 1]
        for r in (base, row):
            print(f"| {r['method']} | {r['row']} | {r['trainable']:,} | {r['step_s'] * 1e3:.1f} ms | "
                  f"{r['peak_bytes'] / 2**20:.1f} MiB | {base['step_s'] / r['step_s']:.2f}x | "
                  f"{r['peak_bytes'] / max(base['peak_bytes'], 1):.2f} |")


if __name__ == "__main__":
    main()
