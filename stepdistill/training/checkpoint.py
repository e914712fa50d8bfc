"""Training checkpoints in safetensors + JSON, written atomically.

A checkpoint is a folder `step-00001000/`: trainable weights (keyed `<network>/<parameter name>`),
optimizer states (one file per network, keyed by parameter name), EMA shadows (`<network>/<rate>/<name>`),
each process's RNG state, and a JSON of counters and LR-scheduler state. It is written under
a temporary name, each file synced, and renamed when whole, so a crash or a full disk mid-save leaves the
previous one intact; only then are checkpoints beyond the newest K deleted. Nothing is unpickled on load.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import StepdistillError
from ..files import sync

STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_state(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state split into tensors ('state/<parameter name>/<name>') and a JSON-able rest.

    `names` are the optimizer's parameters' names in order, so the state is keyed by name, not position."""
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, entry in sd["state"].items():
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{names[idx]}/{name}"] = v.detach().cpu().contiguous()
            else:
                plain.setdefault(names[idx], {})[name] = v
    return tensors, {"state": plain, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, names: list[str], tensors: dict, plain: dict) -> None:
    index = {n: i for i, n in enumerate(names)}
    per_param: dict[int, dict] = {}
    try:
        for key, t in tensors.items():
            pname, name = key.split("/", 1)[1].rsplit("/", 1)  # state/<network>/<parameter>/<name>
            per_param.setdefault(index[pname], {})[name] = t
        for pname, extra in plain["state"].items():
            per_param.setdefault(index[pname], {}).update(extra)
    except KeyError as e:
        raise StepdistillError(f"the checkpoint's optimizer state names parameter {e}, which this run does not "
                               "train: it is from another method or config") from None
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in plain["param_groups"]]
    opt.load_state_dict({"state": per_param, "param_groups": groups})


def list_checkpoints(root: Path) -> list[Path]:
    """The whole checkpoints under root, oldest first (a folder only becomes step-N once whole)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def tmp_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}.tmp"


def fresh_tmp_dir(root: Path, step: int) -> Path:
    """An empty temporary folder for the checkpoint of `step` (what a killed save left there is removed)."""
    tmp = tmp_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_tensors(tensors: dict, path: Path) -> None:
    """A safetensors file, synced to disk before the checkpoint folder is renamed into place."""
    try:
        save_file(tensors, str(path))
    except OSError as e:  # named by the file it failed on
        raise OSError(e.errno, e.strerror or str(e), e.filename or str(path)) from None
    except Exception as e:  # safetensors reports I/O failures as its own error type
        raise OSError(errno.EIO, str(e), str(path)) from None
    sync(path)


def write_text(text: str, path: Path) -> None:
    path.write_text(text)
    sync(path)


def write_failure(error: OSError, tmp: Path, root: Path) -> StepdistillError:
    """The message of a save that failed (disk full, I/O error): what, where, and that the previous one is whole."""
    shutil.rmtree(tmp, ignore_errors=True)
    last = latest_checkpoint(root)
    where = error.filename or tmp
    kept = f"the previous checkpoint {last} is whole and a resume starts from it" if last else "no earlier checkpoint exists"
    hint = "free disk space" if error.errno == errno.ENOSPC else "fix the disk"
    return StepdistillError(f"could not write checkpoint {tmp.name.removesuffix('.tmp')} at {where}: "
                            f"{error.strerror or error}; {kept}; {hint} (or move output_dir), then rerun to resume")


def write_shared(path: Path, *, weights: dict, optimizers: dict, schedulers: dict, ema: dict | None,
                 counters: dict) -> None:
    """The parts every process shares (written by the main process)."""
    write_tensors({k: v.detach().cpu().contiguous() for k, v in weights.items()}, path / "weights.safetensors")
    opt_plain = {}
    for name, (opt, names) in optimizers.items():
        tensors, plain = optimizer_state(opt, names)
        write_tensors(tensors, path / f"optimizer-{name}.safetensors")
        opt_plain[name] = plain
    if ema:
        write_tensors(ema, path / "ema.safetensors")
    state = {"counters": counters, "optimizers": opt_plain,
             "schedulers": {k: s.state_dict() for k, s in schedulers.items()}}
    write_text(json.dumps(state, indent=1, default=float), path / "state.json")  # last: marks the folder whole


def write_rng(path: Path, rank: int) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    write_tensors(rng, path / f"rng-{rank}.safetensors")


def finalize(tmp: Path, root: Path, step: int, keep: int) -> Path:
    """Rename the finished temporary folder into place, then prune old checkpoints."""
    final = root / f"step-{step:08d}"
    if final.exists():  # moved aside, not deleted first: a kill in between leaves one whole copy
        _discard(final)
    os.replace(tmp, final)
    sync(root)
    for old in list_checkpoints(root)[:-keep]:
        _discard(old)
    return final


def _discard(path: Path) -> None:
    """Rename a checkpoint out of the step-N namespace, then delete it: a half-deleted folder is never resumed."""
    trash = path.with_name(path.name + ".old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_checkpoint(path: Path, rank: int) -> dict:
    """Everything a resume needs, as tensors and plain values."""
    state = json.loads((path / "state.json").read_text())
    out = {
        "weights": load_file(str(path / "weights.safetensors")),
        "optimizers": {name: (load_file(str(path / f"optimizer-{name}.safetensors")), plain)
                       for name, plain in state["optimizers"].items()},
        "schedulers": state["schedulers"],
        "counters": state["counters"],
        "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").exists() else None,
    }
    rng_file = path / f"rng-{rank}.safetensors"
    out["rng"] = load_file(str(rng_file)) if rng_file.exists() else None
    return out


def restore_rng(rng: dict | None) -> None:
    if rng is None:
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
