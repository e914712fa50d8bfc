"""One training loop for every distiller, on accelerate.

The trainer knows optimizer groups, precision, accumulation, clipping, EMA, checkpoints,
trackers, progress and sample grids; it knows nothing of any method. A distiller's
loss(batch, step) returns one loss per trainable group it wants stepped now (others are
logged), so alternating schedules (two time-scale updates) need no trainer code.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm

from ..config import RunConfig, to_dict
from ..errors import StepdistillError
from . import checkpoint as ckpt
from .data import batch_iterator
from .ema import MultiRateEMA, ema_name
from .grid import save_grid

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_lr_scheduler(optimizer, name: str, warmup: int, total: int):
    """LambdaLR with linear warm-up, then constant, linear or cosine decay."""

    def factor(step: int) -> float:
        if warmup and step < warmup and name != "constant":
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class Trainer:
    """Runs a distiller to `train.max_steps` optimizer steps, resumably."""

    def __init__(self, distiller, dataset, config: RunConfig, accelerator: Accelerator | None = None,
                 evaluator: Callable | None = None):
        self.cfg = config
        self.tc = config.train
        self.distiller = distiller
        self.dataset = dataset
        self.evaluator = evaluator
        self.output_dir = Path(config.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        fresh_accelerate_state()
        report = self.tc.report_to if self.tc.report_to != "none" and _tensorboard_available() else None
        self.accelerator = accelerator or Accelerator(
            mixed_precision=self.tc.mixed_precision,
            gradient_accumulation_steps=self.tc.gradient_accumulation_steps,
            log_with=report,
            project_dir=str(self.output_dir),
            cpu=not torch.cuda.is_available(),  # lets torchrun-started CPU processes form a gloo group
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=distiller.find_unused_parameters)],
        )
        acc = self.accelerator
        distiller.to(acc.device)
        weight_dtype = DTYPES[self.tc.mixed_precision]
        for module in distiller.frozen_modules():
            if any(p.dtype != weight_dtype for p in module.parameters()):
                module.to(weight_dtype)

        self.groups = distiller.trainable_groups()
        if not any(self.groups.values()):
            raise StepdistillError(f"method {distiller.name!r} has no trainable parameters")
        self.optimizers = {
            name: torch.optim.AdamW(params, lr=self.tc.learning_rate, betas=(self.tc.adam_beta1, self.tc.adam_beta2),
                                    eps=self.tc.adam_epsilon, weight_decay=self.tc.weight_decay)
            for name, params in self.groups.items()}
        self.schedulers = {name: make_lr_scheduler(opt, self.tc.lr_scheduler, self.tc.lr_warmup_steps, self.tc.max_steps)
                           for name, opt in self.optimizers.items()}
        rates = {ema_name(d): d for d in self.tc.ema_decays}
        rates.update(distiller.ema_rates())
        self.ema = MultiRateEMA(distiller.student, rates, backend=config.kernels.ema, warmup=self.tc.ema_warmup) \
            if rates else None
        distiller.bind_ema(self.ema)
        self.model = acc.prepare(distiller)
        prepared = acc.prepare(*self.optimizers.values())
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        self.optimizers = dict(zip(self.optimizers, prepared))
        self.step = 0
        self.micro_step = 0
        self.logs: dict[str, float] = {}  # the latest step's losses and metrics
        torch.manual_seed(config.seed + acc.process_index)  # each process draws its own noise

    # -- state ----------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"{g}/{i}": p.detach() for g, params in self.groups.items() for i, p in enumerate(params)}

    def load_trainable_state(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for g, params in self.groups.items():
                for i, p in enumerate(params):
                    p.copy_(sd[f"{g}/{i}"])

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        tmp = ckpt.tmp_dir(self.ckpt_root, self.step)
        if acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        ckpt.write_rng(tmp, acc.process_index)
        if acc.is_main_process:
            ckpt.write_shared(tmp, weights=self.trainable_state(),
                              optimizers={k: o.optimizer for k, o in self.optimizers.items()},
                              schedulers=self.schedulers, ema=self.ema.state_dict() if self.ema else None,
                              counters={"step": self.step, "micro_step": self.micro_step})
        acc.wait_for_everyone()
        final = self.ckpt_root / f"step-{self.step:08d}"
        if acc.is_main_process:
            final = ckpt.finalize(tmp, self.ckpt_root, self.step, self.tc.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def resume_path(self) -> Path | None:
        r = self.tc.resume
        if r == "none":
            return None
        if r == "auto":
            return ckpt.latest_checkpoint(self.ckpt_root)
        path = Path(r)
        if not (path / "state.json").is_file():
            raise StepdistillError(f"train.resume = {r}: not a checkpoint folder (no state.json)")
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.read_checkpoint(path, self.accelerator.process_index)
        self.load_trainable_state(state["weights"])
        for name, (tensors, plain) in state["optimizers"].items():
            ckpt.load_optimizer_state(self.optimizers[name].optimizer, tensors, plain)
        for name, sd in state["schedulers"].items():
            self.schedulers[name].load_state_dict(sd)
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        ckpt.restore_rng(state["rng"])
        self.step = state["counters"]["step"]
        self.micro_step = state["counters"]["micro_step"]

    # -- samples ------------------------------------------------------------------------------------
    def export_module(self):
        """The weights written at export: the chosen EMA shadow, or the live student."""
        choice = self.tc.export_weights
        if choice == "auto":
            choice = ema_name(max(self.tc.ema_decays)) if self.tc.ema_decays else "student"
        if choice == "student":
            return self.distiller.student
        if self.ema is None or choice not in self.ema.rates:
            raise StepdistillError(f"train.export_weights = {choice!r} is not kept; "
                                   f"kept: student, {', '.join(self.ema.rates) if self.ema else '(no EMA)'}")
        return self.ema.module(choice)

    def fixed_sample_inputs(self):
        g = torch.Generator().manual_seed(self.cfg.seed + 12345)
        n = self.tc.num_sample_images
        noise = torch.randn((n, *self.distiller.teacher_info.sample_shape), generator=g)
        raw = self.distiller.teacher_info.conditioner.example_conditions(n)
        return noise, raw

    @torch.no_grad()
    def sample_grid(self, path: Path, steps: int) -> Path:
        d = self.distiller
        noise, raw = self.fixed_sample_inputs()
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            cond = d.teacher_info.conditioner.encode(raw, device) if raw else {}
            gen = torch.Generator(device=device).manual_seed(self.cfg.seed)
            x0 = d.sample(noise.to(device), cond, steps, generator=gen, model=self.export_module())
            images = d.codec.decode(x0)
        return save_grid(images, path)

    def export(self, out_dir: Path, steps: int) -> Path:
        """Write the student (export weights) as a pipeline directory, with a sample grid at `steps`."""
        from ..export import export_student

        path = export_student(self.distiller, out_dir, steps, model=self.export_module(), config=to_dict(self.cfg),
                              lora_only=self.cfg.export.lora_only)
        self.sample_grid(self.output_dir / "samples" / f"{out_dir.name}-{steps}step.png", steps)
        return path

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> "Trainer":
        acc, tc = self.accelerator, self.tc
        resume = self.resume_path()
        if resume is not None:
            self.load_checkpoint(resume)
            acc.print(f"resumed from {resume} at step {self.step}")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.log_with:
            acc.init_trackers("logs", config=_flatten(to_dict(self.cfg)))
        data = batch_iterator(self.dataset, tc.batch_size, self.cfg.seed, self.micro_step, acc.process_index,
                              acc.num_processes, self.cfg.data.num_workers)
        bar = tqdm(total=tc.max_steps, initial=self.step, desc=f"{self.distiller.name}",
                   disable=not (tc.progress_bar and acc.is_local_main_process), dynamic_ncols=True)
        logs: dict[str, float] = {}
        milestones = {at: (folder, steps) for at, folder, steps in self.distiller.milestones() if at < tc.max_steps}
        t_last = time.perf_counter()
        while self.step < tc.max_steps:
            self.model.train()
            for _ in range(tc.gradient_accumulation_steps):
                batch = next(data)
                self.micro_step += 1
                with acc.accumulate(self.model):
                    out = self.model(batch, self.step)
                    losses = {g: out[g] for g in self.groups if g in out}
                    if not losses:
                        raise StepdistillError(f"{self.distiller.name}.loss returned no loss for groups {list(self.groups)}")
                    acc.backward(sum(losses.values()))
                    if acc.sync_gradients and tc.max_grad_norm is not None:
                        for g in losses:
                            norm = acc.clip_grad_norm_(self.groups[g], tc.max_grad_norm)
                            logs[f"grad_norm/{g}"] = float(norm)
                    for g in losses:
                        self.optimizers[g].step()
                        self.optimizers[g].zero_grad(set_to_none=True)
            for g in losses:
                self.schedulers[g].step()
            if self.ema is not None:
                self.ema.update()
            self.step += 1
            for k, v in out.items():
                logs[k if k not in self.groups else f"loss/{k}"] = float(v.detach().float().mean()) \
                    if torch.is_tensor(v) else float(v)
            self.logs = dict(logs)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                now = time.perf_counter()
                logs["lr"] = self.schedulers[next(iter(self.schedulers))].get_last_lr()[0]
                logs["steps_per_second"] = tc.log_every / max(now - t_last, 1e-9)
                t_last = now
                acc.log(logs, step=self.step)
            if tc.sample_every and self.step % tc.sample_every == 0 and acc.is_main_process:
                self.sample_grid(self.output_dir / "samples" / f"step-{self.step:08d}.png", self.cfg.export.steps[0])
            if self.evaluator is not None and self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
                metrics = self.evaluator(self.distiller, self.export_module(), self.step)
                if metrics:
                    acc.log(metrics, step=self.step)
            if self.step in milestones and acc.is_main_process:  # before the checkpoint: a resumed run
                self.export(self.output_dir / milestones[self.step][0], milestones[self.step][1])  # never skips one
            if (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or self.step == tc.max_steps:
                self.save_checkpoint()
        bar.close()
        acc.wait_for_everyone()
        return self

    def finish(self) -> None:
        self.accelerator.end_training()


def fresh_accelerate_state() -> None:
    """Forget the previous run's precision and accumulation settings (several runs in one process,
    as the quickstart does); the distributed process group itself is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401

        return True
    except ImportError:
        return False
