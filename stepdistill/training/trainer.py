"""One training loop for every distiller, on accelerate.

The trainer knows networks, optimizers, precision, accumulation, clipping, EMA, checkpoints, trackers,
progress and sample grids; it knows nothing of any method. Each optimizer step it asks the distiller
which trainable networks update (`update_plan`) and, for each in turn, runs forward and backward of that
network's loss with only that network's parameters requiring gradients, clips, steps its optimizer and
clears every network's gradients: no loss reaches a network it was not meant for. Every micro-batch of the
step is shared by the planned networks, so the data order is a function of the step alone (exact resume).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm

from ..config import RunConfig, to_dict
from ..errors import ConfigError, StepdistillError
from ..files import safe_child
from ..teacher import frozen_dtype
from . import checkpoint as ckpt
from .data import batch_iterator
from .ema import EMASet, ema_name
from .grid import save_grid

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LIVE_WEIGHTS = ("live", "student")  # train.export_weights values meaning the trained weights themselves


def fused_adamw(params) -> bool | None:
    """True where torch has a fused AdamW for these parameters (CUDA; CPU from torch 2.4): one kernel per
    step instead of a dozen foreach passes (measured 2.4-4x faster optimizer steps on CPU,
    benchmarks/RESULTS.md). None leaves torch's default (foreach)."""
    devices = {p.device.type for p in params}
    cpu_ok = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
    return True if devices and devices <= ({"cuda", "cpu"} if cpu_ok else {"cuda"}) else None


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


@dataclass
class GroupSettings:
    """The optimizer settings one network trains with: its `train.groups.<name>` over the global ones."""

    learning_rate: float
    betas: tuple[float, float]
    weight_decay: float
    max_grad_norm: float | None
    loss_scale: float

    @classmethod
    def resolve(cls, tc, name: str) -> "GroupSettings":
        g = tc.groups.get(name)

        def pick(key):
            own = getattr(g, key) if g is not None else None
            return own if own is not None else getattr(tc, key)

        norm = pick("max_grad_norm")
        return cls(pick("learning_rate"), (pick("adam_beta1"), pick("adam_beta2")), pick("weight_decay"),
                   norm or None, g.loss_scale if g is not None else 1.0)


def swap_module(root: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Make every reference to `old` among root's submodules point at `new` (a DDP/FSDP wrapper of it)."""
    for module in list(root.modules()):
        if module is new:
            continue
        for key, child in list(module._modules.items()):
            if child is old:
                module._modules[key] = new


class LogBuffer:
    """Per-step values kept on the device and turned into floats only when logged (no per-step host sync)."""

    def __init__(self):
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, value) -> None:
        v = value.detach().float().mean() if torch.is_tensor(value) else torch.tensor(float(value))
        self.values.setdefault(key, []).append(v)

    def pop_means(self) -> dict[str, float]:
        out = {k: torch.stack([x.to(v[0].device) for x in v]).mean().item() for k, v in self.values.items() if v}
        self.values = {}
        return out


class Trainer:
    """Runs a distiller to `train.max_steps` optimizer steps, resumably."""

    def __init__(self, distiller, dataset, config: RunConfig, accelerator: Accelerator | None = None,
                 evaluator: Callable | None = None):
        self.cfg = config
        self.tc = tc = config.train
        self.distiller = distiller
        self.dataset = dataset
        self.evaluator = evaluator
        self.output_dir = Path(config.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        fresh_accelerate_state()
        report = tc.report_to if tc.report_to != "none" and _tensorboard_available() else None
        self.accelerator = accelerator or Accelerator(
            mixed_precision=tc.mixed_precision,
            log_with=report,
            project_dir=str(self.output_dir),
            cpu=not torch.cuda.is_available(),  # lets torchrun-started CPU processes form a gloo group
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=distiller.find_unused_parameters)],
        )
        acc = self.accelerator
        distiller.to(acc.device)
        weight_dtype = DTYPES[tc.mixed_precision]
        for module in distiller.frozen_modules():
            dtype = frozen_dtype(module, weight_dtype)  # an fp16-overflowing VAE (SDXL's own) stays fp32
            if any(p.dtype != dtype for p in module.parameters()):
                module.to(dtype)

        self.networks = dict(distiller.trainable_networks())  # unwrapped; the distiller may call wrappers
        self.exported = dict(distiller.exported_networks())
        self.groups = check_groups(distiller, self.networks)  # optimizer group -> its networks
        # each group's parameters, named <network>/<parameter> (the checkpoint's keys)
        self.params = {g: [(f"{net}/{n}", p) for net in nets for n, p in self.networks[net].named_parameters()
                           if p.requires_grad] for g, nets in self.groups.items()}
        empty = [g for g, ps in self.params.items() if not ps]
        if not self.networks or empty:
            raise StepdistillError(f"method {distiller.name!r} has no trainable parameters"
                                   + (f" in {', '.join(empty)}" if empty else ""))
        unknown = sorted(set(tc.groups) - set(self.groups))
        if unknown:
            raise ConfigError(f"train.groups.{unknown[0]}: {distiller.name} has no trainable network of that name; "
                              f"its networks are {', '.join(self.groups)}")
        self.settings = {g: GroupSettings.resolve(tc, g) for g in self.groups}
        self.optimizers = {
            name: torch.optim.AdamW([p for _, p in self.params[name]], lr=s.learning_rate, betas=s.betas,
                                    eps=tc.adam_epsilon, weight_decay=s.weight_decay,
                                    fused=fused_adamw(p for _, p in self.params[name]))
            for name, s in self.settings.items()}
        self.schedulers = {name: make_lr_scheduler(opt, tc.lr_scheduler, tc.lr_warmup_steps, tc.max_steps)
                           for name, opt in self.optimizers.items()}
        self.ema = self._build_ema(distiller)
        distiller.bind(self.ema, config.seed)
        self.prepared = {}
        for name, net in self.networks.items():  # each network is prepared (DDP, autocast) on its own
            wrapped = acc.prepare(net)
            if wrapped is not net:
                swap_module(distiller, net, wrapped)
            self.prepared[name] = wrapped
        for name, opt in self.optimizers.items():
            self.optimizers[name] = acc.prepare(opt)
        self.step = 0
        self.micro_step = 0
        self.logs: dict[str, float] = {}  # the latest logged losses and metrics
        self.nonfinite: dict[str, int] = {}  # per network: updates skipped for a NaN/inf loss or gradient
        self.nonfinite_streak: dict[str, int] = {}  # ... of them in a row, up to now
        torch.manual_seed(config.seed + acc.process_index)  # each process draws its own noise

    def _build_ema(self, distiller) -> EMASet | None:
        own = distiller.ema_rates()
        stray = sorted(set(own) - set(self.exported))
        if stray:
            raise StepdistillError(f"{distiller.name}.ema_rates names {stray[0]!r}, which is not an exported network")
        rates = {name: {**{ema_name(d): d for d in self.tc.ema_decays}, **own.get(name, {})} for name in self.exported}
        ema = EMASet(self.exported, rates, backend=self.cfg.kernels.ema, warmup=self.tc.ema_warmup)
        return ema if ema else None

    # -- state ----------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for ps in self.params.values() for n, p in ps}

    def load_trainable_state(self, sd: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.trainable_state() if k not in sd]
        if missing:
            raise StepdistillError(f"the checkpoint lacks {len(missing)} trainable weights (e.g. {missing[0]}): "
                                   "it is from another method or config; resume from this run's own checkpoints")
        with torch.no_grad():
            for ps in self.params.values():
                for n, p in ps:
                    p.copy_(sd[n])

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        tmp = ckpt.tmp_dir(self.ckpt_root, self.step)
        try:
            if acc.is_main_process:
                ckpt.fresh_tmp_dir(self.ckpt_root, self.step)
            acc.wait_for_everyone()
            ckpt.write_rng(tmp, acc.process_index)
            if acc.is_main_process:
                ckpt.write_shared(tmp, weights=self.trainable_state(),
                                  optimizers={k: (o.optimizer, [n for n, _ in self.params[k]])
                                              for k, o in self.optimizers.items()},
                                  schedulers=self.schedulers, ema=self.ema.state_dict() if self.ema else None,
                                  counters={"step": self.step, "micro_step": self.micro_step})
        except OSError as e:
            raise ckpt.write_failure(e, tmp, self.ckpt_root) from None
        acc.wait_for_everyone()
        final = self.ckpt_root / f"step-{self.step:08d}"
        if acc.is_main_process:
            try:
                final = ckpt.finalize(tmp, self.ckpt_root, self.step, self.tc.keep_checkpoints)
            except OSError as e:
                raise ckpt.write_failure(e, tmp, self.ckpt_root) from None
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

    def resume(self) -> Path | None:
        """Load the checkpoint `train.resume` names, once (the runner calls it before writing anything)."""
        if not hasattr(self, "_resumed"):
            self._resumed = self.resume_path()
            if self._resumed is not None:
                self.load_checkpoint(self._resumed)
                self.accelerator.print(f"resumed from {self._resumed} at step {self.step}")
        return self._resumed

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.read_checkpoint(path, self.accelerator.process_index)
        try:
            self.load_trainable_state(state["weights"])
        except StepdistillError as e:
            raise StepdistillError(f"{path}: {e}") from None
        for name, (tensors, plain) in state["optimizers"].items():
            ckpt.load_optimizer_state(self.optimizers[name].optimizer, [n for n, _ in self.params[name]], tensors, plain)
        for name, sd in state["schedulers"].items():
            self.schedulers[name].load_state_dict(sd)
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        ckpt.restore_rng(state["rng"])
        self.step = state["counters"]["step"]
        self.micro_step = state["counters"]["micro_step"]

    # -- exported weights and samples -----------------------------------------------------------
    def export_networks(self) -> dict[str, torch.nn.Module]:
        """The weights written at export, per exported network: the chosen EMA shadow, or the live network."""
        choice = self.tc.export_weights
        if choice == "auto":
            choice = ema_name(max(self.tc.ema_decays)) if self.tc.ema_decays else "live"
        if choice in LIVE_WEIGHTS:
            return dict(self.exported)
        kept = {r for name in self.exported for r in (self.ema.rates(name) if self.ema else {})}
        if choice not in kept:
            raise StepdistillError(f"train.export_weights = {choice!r} is not kept; kept: live"
                                   f"{''.join(', ' + k for k in sorted(kept)) if kept else ' (no EMA)'}")
        return {name: self.ema.module(name, choice) for name in self.exported}

    def fixed_sample_inputs(self):
        g = torch.Generator().manual_seed(self.cfg.seed + 12345)
        n = self.tc.num_sample_images
        noise = torch.randn((n, *self.distiller.teacher_info.sample_shape), generator=g)
        return noise, self.distiller.teacher_info.conditioner.example_conditions(n)

    @torch.no_grad()
    def sample_grid(self, path: Path, steps: int) -> Path:
        """A PNG grid of the student pipeline (built from the export weights) on fixed noise and conditions."""
        from ..sampling import pipeline_images

        d = self.distiller
        noise, raw = self.fixed_sample_inputs()
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(self.networks):
            pipe = d.build_pipeline(self.export_networks(), steps)
            pipe.set_progress_bar_config(disable=True)
            gen = torch.Generator(device=device).manual_seed(self.cfg.seed)
            images = pipeline_images(pipe, len(noise), steps, generator=gen, guidance=d.eval_guidance_scales()[0],
                                     conditions=raw, latents=noise.to(device), **d.pipeline_kwargs())
        return save_grid(images, path)

    def export(self, out_dir: Path, steps: int) -> Path:
        """Write the student (export weights) as a pipeline directory, with a sample grid at `steps`."""
        from ..export import export_student

        path = export_student(self.distiller, out_dir, steps, networks=self.export_networks(),
                              config=to_dict(self.cfg), lora_only=self.cfg.export.lora_only)
        self.sample_grid(self.output_dir / "samples" / f"{out_dir.name}-{steps}step.png", steps)
        return path

    # -- the loop -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def only_trainable(self, name: str):
        """Within: only group `name`'s parameters require gradients (the others' are frozen for this update)."""
        others = [p for g, ps in self.params.items() if g != name for _, p in ps]
        for p in others:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in others:
                p.requires_grad_(True)

    def update(self, name: str, batches: list, logs: LogBuffer) -> bool:
        """One optimizer step of group `name` over the step's micro-batches; False (and no step) when a loss or
        gradient is not finite."""
        acc, settings = self.accelerator, self.settings[name]
        outs = []
        with self.only_trainable(name):
            for i, batch in enumerate(batches):
                with contextlib.ExitStack() as stack:
                    if i < len(batches) - 1:  # gradients are averaged across processes on the last micro-batch
                        for net in self.groups[name]:
                            stack.enter_context(acc.no_sync(self.prepared[net]))
                    stack.enter_context(acc.autocast())
                    out = self.distiller.loss(batch, self.step, name)
                    if "loss" not in out:
                        raise StepdistillError(f"{self.distiller.name}.loss(network={name!r}) returned no 'loss'")
                    acc.backward(out["loss"] * (settings.loss_scale / len(batches)))
                outs.append(out)
            params = [p for _, p in self.params[name]]
            norm = acc.clip_grad_norm_(params, settings.max_grad_norm) if settings.max_grad_norm is not None else None
            finite = self.all_finite([o["loss"] for o in outs], params, norm)
            if finite:
                self.optimizers[name].step()
                for out in outs:
                    for key, value in out.items():
                        logs.add(f"loss/{name}" if key == "loss" else f"{name}/{key}", value)
                if norm is not None:
                    logs.add(f"grad_norm/{name}", norm)
        for opt in self.optimizers.values():  # every network's: nothing carries into another update
            opt.zero_grad(set_to_none=True)
        return finite

    def all_finite(self, losses: list, params: list, norm) -> bool:
        """Whether the losses and gradients of an update are finite on every process (one host sync per update).
        Under fp16 the grad scaler skips overflowing gradients itself (and lowers its scale), so only losses count."""
        acc = self.accelerator
        checks = [torch.as_tensor(loss).detach().float().reshape(-1) for loss in losses]
        if acc.scaler is None:
            if norm is None:
                grads = [p.grad for p in params if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
            checks.append(norm.detach().float().reshape(-1).to(checks[0].device))
        bad = (~torch.isfinite(torch.cat(checks))).sum()
        if acc.num_processes > 1:
            bad = acc.reduce(bad, reduction="sum")
        return not bool(bad)

    def count_nonfinite(self, plan: list, skipped: list) -> None:
        """Count skipped updates; `train.max_consecutive_nonfinite` in a row for one network stop the run."""
        for name in plan:
            self.nonfinite_streak[name] = self.nonfinite_streak.get(name, 0) + 1 if name in skipped else 0
        for name in skipped:
            self.nonfinite[name] = self.nonfinite.get(name, 0) + 1
            if self.accelerator.is_local_main_process:
                tqdm.write(f"step {self.step}: {name}'s loss or gradient is not finite; its update was skipped "
                           f"({self.nonfinite[name]} so far)")
        limit = self.tc.max_consecutive_nonfinite
        stuck = [name for name in skipped if self.nonfinite_streak[name] >= limit]
        if stuck:
            last = ckpt.latest_checkpoint(self.ckpt_root)
            raise StepdistillError(
                f"training stopped at step {self.step}: {stuck[0]}'s loss or gradient was NaN/inf in "
                f"{limit} updates in a row (train.max_consecutive_nonfinite = {limit}); "
                + (f"the last good checkpoint is {last}" if last else "no checkpoint was written")
                + ". Lower the learning rate, clip gradients (train.max_grad_norm) or train in bf16/fp32, then resume")

    def train(self) -> "Trainer":
        acc, tc = self.accelerator, self.tc
        self.resume()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.log_with:
            acc.init_trackers("logs", config=_flatten(to_dict(self.cfg)))
        accum = tc.gradient_accumulation_steps
        data = batch_iterator(self.dataset, tc.batch_size, self.cfg.seed, self.micro_step, acc.process_index,
                              acc.num_processes, self.cfg.data.num_workers)
        bar = tqdm(total=tc.max_steps, initial=self.step, desc=f"{self.distiller.name}",
                   disable=not (tc.progress_bar and acc.is_local_main_process), dynamic_ncols=True)
        logs = LogBuffer()
        milestones = {at: (folder, steps) for at, folder, steps in self.distiller.milestones() if at < tc.max_steps}
        t_last, steps_since = time.perf_counter(), 0
        self.distiller.train()
        while self.step < tc.max_steps:
            plan = self.distiller.update_plan(self.step)
            stray = [name for name in plan if name not in self.groups]
            if stray:
                raise StepdistillError(f"{self.distiller.name}.update_plan names {stray[0]!r}, not one of its "
                                       f"trainable networks ({', '.join(self.groups)})")
            batches = [next(data) for _ in range(accum)]
            self.micro_step += accum
            skipped = [name for name in plan if not self.update(name, batches, logs)]
            self.count_nonfinite(plan, skipped)
            for scheduler in self.schedulers.values():  # learning rates follow the optimizer step, updated or not
                scheduler.step()
            if self.ema is not None:
                self.ema.update(skip=skipped)
            self.step += 1
            steps_since += 1
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                now = time.perf_counter()
                self.logs = logs.pop_means()
                self.logs["lr"] = self.schedulers[next(iter(self.schedulers))].get_last_lr()[0]
                self.logs["steps_per_second"] = steps_since / max(now - t_last, 1e-9)
                self.logs.update({f"nonfinite/{k}": float(v) for k, v in self.nonfinite.items()})
                t_last, steps_since = now, 0
                acc.log(self.logs, step=self.step)
                bar.set_postfix({**{k.split("/")[-1]: f"{v:.4g}" for k, v in self.logs.items() if k.startswith("loss/")},
                                 **({"skipped": sum(self.nonfinite.values())} if self.nonfinite else {})})
            if tc.sample_every and self.step % tc.sample_every == 0 and acc.is_main_process:
                self.sample_grid(self.output_dir / "samples" / f"step-{self.step:08d}.png", self.cfg.export.steps[0])
            if self.evaluator is not None and self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
                with eval_mode(self.networks):
                    metrics = self.evaluator(self.distiller, self.export_networks(), self.step)
                if metrics:
                    acc.log(metrics, step=self.step)
            if self.step in milestones and acc.is_main_process:  # before the checkpoint: a resumed run
                self.export(safe_child(self.output_dir, milestones[self.step][0], "milestone folder"),  # never skips one
                            milestones[self.step][1])
            if (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or self.step == tc.max_steps:
                self.save_checkpoint()
        bar.close()
        acc.wait_for_everyone()
        return self

    def finish(self) -> None:
        self.accelerator.end_training()


def check_groups(distiller, networks: dict) -> dict[str, list[str]]:
    """The distiller's optimizer groups, each network in exactly one."""
    groups = {g: list(nets) for g, nets in distiller.optimizer_groups().items()}
    placed = [net for nets in groups.values() for net in nets]
    wrong = sorted({n for n in placed if placed.count(n) > 1 or n not in networks} | (set(networks) - set(placed)))
    if wrong:
        raise StepdistillError(f"{distiller.name}.optimizer_groups must hold each trainable network once; "
                               f"{wrong[0]!r} is not")
    return groups


@contextlib.contextmanager
def eval_mode(networks: dict):
    """Sampling runs the networks in eval mode; training mode is restored afterwards."""
    modes = {name: net.training for name, net in networks.items()}
    for net in networks.values():
        net.eval()
    try:
        yield
    finally:
        for name, net in networks.items():
            net.train(modes[name])


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
