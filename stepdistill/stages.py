"""Stages: the resumable pieces one config stands for, run in order, finished ones skipped.

A stage has an output folder and answers two questions: is it finished, and run it. Three kinds:

- TrainingStage: a whole training run (its own checkpoints, resume and exported student);
- GenerationStage: writes numbered safetensors shards and a manifest (reflow's noise-sample pairs); a crash
  keeps finished shards (each is written under a temporary name and renamed when whole) and the next run
  redoes only the missing or torn ones; under `accelerate launch` or torchrun each process writes its share;
- AssemblyStage: combines earlier stages' outputs into one folder (multi-student's final pipeline).

A method lists its stages in code (`Distiller.stages`), or a config lists them under `stages:` (StageSpec:
name, kind, options); kinds other than `train` are registered here by the modules that define them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import ConfigError, StepdistillError
from .files import atomic_save_file, atomic_write_text, readable_safetensors

STAGE_KINDS: dict[str, Callable] = {}  # kind -> factory(base_cfg, name, output_dir, options) -> Stage
MANIFEST = "manifest.json"
ASSEMBLED = "assembled.json"


def register_stage_kind(kind: str):
    """Decorator: make `factory(base_cfg, name, output_dir, options) -> Stage` usable as `kind:` in `stages:`."""

    def wrap(factory):
        STAGE_KINDS[kind] = factory
        return factory

    return wrap


class Stage:
    """One resumable piece of a run."""

    name: str = ""
    output_dir: Path
    config = None  # the RunConfig of a training stage
    student_dir: Path | None = None  # the pipeline this stage leaves, if any (evaluated by the quickstart)

    def finished(self) -> bool:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError


class TrainingStage(Stage):
    """A training run of `config`; finished when its final checkpoint and exported student exist."""

    def __init__(self, config, name: str | None = None):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.name = name or self.output_dir.name
        self.student_dir = self.output_dir / "student"

    def finished(self) -> bool:
        from .export import CARD_FILE
        from .training import checkpoint as ckpt

        latest = ckpt.latest_checkpoint(self.output_dir / "checkpoints")
        return (latest is not None and latest.name == f"step-{self.config.train.max_steps:08d}"
                and (self.student_dir / CARD_FILE).is_file())

    def run(self) -> None:
        from .runner import run

        run(self.config)


class GenerationStage(Stage):
    """`num_items` items written as shards of `shard_size`, each a pure function of (seed, shard index).

    Subclasses define `make_shard(index, start, count, generator) -> dict of tensors` (first dimension
    `count`) and may add string metadata per shard (`shard_metadata`). `settings` identify what is generated; a
    folder holding shards of other settings is refused."""

    unit = "items"  # what an item is called in the throughput line

    def __init__(self, name: str, output_dir: str | Path, num_items: int, shard_size: int, seed: int = 0,
                 settings: dict | None = None):
        if num_items < 1 or shard_size < 1:
            raise ConfigError(f"stage {name}: the number of items ({num_items}) and the shard size ({shard_size}) "
                              "must be at least 1")
        self.name, self.output_dir = name, Path(output_dir)
        self.num_items, self.shard_size, self.seed = num_items, shard_size, seed
        self.settings = {"num_items": num_items, "shard_size": shard_size, "seed": seed, **(settings or {})}

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_items / self.shard_size)

    def shard_path(self, index: int) -> Path:
        return self.output_dir / f"shard-{index:05d}.safetensors"

    def shard_whole(self, index: int) -> bool:
        """Whether shard `index` exists whole (a torn or foreign file is made again, never read as whole)."""
        meta = readable_safetensors(self.shard_path(index))
        count = min(self.shard_size, self.num_items - index * self.shard_size)
        return meta is not None and meta.get("index") == str(index) and meta.get("count") == str(count)

    def make_shard(self, index: int, start: int, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def shard_metadata(self, index: int, start: int, count: int) -> dict[str, str]:
        """Extra safetensors metadata of shard `index` (reflow pairs' prompts); default none."""
        return {}

    def manifest(self) -> dict | None:
        path = self.output_dir / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None

    def check_settings(self) -> None:
        m = self.manifest()
        if m is not None and m["settings"] != json.loads(json.dumps(self.settings)):
            raise StepdistillError(f"{self.output_dir} holds shards made with other settings ({m['settings']}); "
                                   "choose another output folder or delete it")

    def finished(self) -> bool:
        self.check_settings()
        m = self.manifest()
        return m is not None and m.get("complete", False) and all(self.shard_whole(i)
                                                                  for i in range(self.num_shards))

    def run(self) -> None:
        from accelerate import PartialState
        from tqdm.auto import tqdm

        state = PartialState()
        self.check_settings()
        if state.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._write_manifest(complete=False)
        state.wait_for_everyone()
        mine = [i for i in range(self.num_shards) if i % state.num_processes == state.process_index]
        todo = [i for i in mine if not self.shard_whole(i)]
        start_time, done = time.perf_counter(), 0
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{self.name} shards",
                   disable=not state.is_local_main_process, dynamic_ncols=True)
        for i in todo:
            start = i * self.shard_size
            count = min(self.shard_size, self.num_items - start)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            tensors = self.make_shard(i, start, count, g)
            meta = {**self.shard_metadata(i, start, count), "index": str(i), "start": str(start), "count": str(count)}
            write_shard(self.shard_path(i), tensors, meta)
            done += count
            bar.update(1)
        bar.close()
        if todo:
            rate = done / max(time.perf_counter() - start_time, 1e-9)
            print(f"{self.name}: {done} {self.unit} in {len(todo)} shards on process {state.process_index} "
                  f"({rate:.1f} {self.unit}/s)", flush=True)
        state.wait_for_everyone()
        if state.is_main_process:
            self._write_manifest(complete=True)
        state.wait_for_everyone()

    def _write_manifest(self, complete: bool) -> None:
        shards = [{"file": self.shard_path(i).name, "start": i * self.shard_size,
                   "count": min(self.shard_size, self.num_items - i * self.shard_size)} for i in range(self.num_shards)]
        atomic_write_text(self.output_dir / MANIFEST, json.dumps(
            {"kind": type(self).__name__, "settings": self.settings, "complete": complete, "shards": shards}, indent=1))


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name and rename it: a reader never sees a torn shard."""
    atomic_save_file(tensors, path, metadata)


class AssemblyStage(Stage):
    """`assemble(inputs, folder)` builds the output from earlier stages' folders; finished when it completed.

    It writes into a temporary folder that replaces the output only when whole."""

    def __init__(self, name: str, output_dir: str | Path, inputs: dict[str, Path],
                 assemble: Callable[[dict[str, Path], Path], None], student: bool = True):
        self.name, self.output_dir, self.inputs, self.assemble = name, Path(output_dir), dict(inputs), assemble
        self.student_dir = self.output_dir if student else None

    def finished(self) -> bool:
        return (self.output_dir / ASSEMBLED).is_file()

    def run(self) -> None:
        missing = [str(p) for p in self.inputs.values() if not Path(p).exists()]
        if missing:
            raise StepdistillError(f"stage {self.name} needs {missing[0]}, which an earlier stage should have written")
        tmp = self.output_dir.with_name(self.output_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.assemble(self.inputs, tmp)
        (tmp / ASSEMBLED).write_text(json.dumps({"inputs": {k: str(v) for k, v in self.inputs.items()}}, indent=1))
        shutil.rmtree(self.output_dir, ignore_errors=True)
        os.replace(tmp, self.output_dir)


# ----------------------------------------------------------------------------- building the list


_REF = re.compile(r"\$\{stages\.([A-Za-z0-9_.-]+)\}")


def _resolve_refs(value, outputs: dict[str, Path], where: str):
    """Replace '${stages.NAME}' in strings (also inside lists and mappings) by stage NAME's output folder."""
    if isinstance(value, str):
        def sub(m):
            if m.group(1) not in outputs:
                raise ConfigError(f"{where}: '${{stages.{m.group(1)}}}' names no earlier stage; "
                                  f"earlier stages: {', '.join(outputs) or '(none)'}")
            return str(outputs[m.group(1)])
        return _REF.sub(sub, value)
    if isinstance(value, list):
        return [_resolve_refs(v, outputs, where) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_refs(v, outputs, where) for k, v in value.items()}
    return value


def expand(item) -> list[Stage]:
    """A Distiller.stages entry as Stage objects: a RunConfig is a training run (its method may expand it)."""
    if isinstance(item, Stage):
        return [item]
    from .distillers import get_distiller_class

    items = get_distiller_class(item.method).stages(item)
    if len(items) == 1 and items[0] is item:
        return [TrainingStage(item)]
    return [s for sub in items for s in expand(sub)]


def build_stages(cfg) -> list[Stage]:
    """The stages of a config: its `stages:` list, or its method's own (Distiller.stages)."""
    if not cfg.stages:
        return expand(cfg)
    from .config import apply_overrides, build_config, to_dict

    base = to_dict(cfg)
    base["stages"] = []
    out, outputs, names = [], {}, set()
    for i, spec in enumerate(cfg.stages):
        where = f"stages[{i}] ({spec.name})"
        if spec.name in names:
            raise ConfigError(f"{where}: two stages are named {spec.name!r}")
        names.add(spec.name)
        folder = Path(cfg.output_dir) / spec.name
        options = _resolve_refs(spec.options, outputs, where)
        if spec.kind == "train":
            data = copy.deepcopy(base)
            data["output_dir"] = str(folder)
            apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in options.items()])
            made = expand(build_config(data))
        elif spec.kind in STAGE_KINDS:
            made = [STAGE_KINDS[spec.kind](cfg, spec.name, folder, options)]
        else:
            raise ConfigError(f"{where}: unknown stage kind {spec.kind!r}; kinds: train, "
                              f"{', '.join(sorted(STAGE_KINDS)) or '(none registered)'}")
        out.extend(made)
        outputs[spec.name] = made[-1].student_dir or made[-1].output_dir
    return out


def run_stages(stages: list[Stage]) -> list[Stage]:
    """Run stages in order, skipping finished ones; a crash in stage k leaves 1..k-1 finished for the next call."""
    for i, stage in enumerate(stages, 1):
        tag = f"stage {i}/{len(stages)} ({stage.name}, {stage.output_dir})"
        if stage.finished():
            if len(stages) > 1:
                print(f"{tag}: finished, skipped", flush=True)
            continue
        if len(stages) > 1:
            print(f"{tag}: running", flush=True)
        stage.run()
    return stages
