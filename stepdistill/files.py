"""Files written whole or not at all: a temporary name, synced, then renamed over the target.

A reader (a resumed run, a cache lookup) sees either the old file or the new one, never a torn one; and
`readable_safetensors` lets it refuse a file torn by something else (a copy cut short, an older writer)."""

from __future__ import annotations

import os
from pathlib import Path


def sync(path: str | Path) -> None:
    """fsync a file or folder, so a rename that follows is not ahead of its contents on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_file(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    """safetensors.torch.save_file, under a per-process temporary name renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        sync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        sync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def safe_child(root: str | Path, name: str, what: str = "name") -> Path:
    """root/name, refusing a name that would leave root (absolute, '..', empty): export writes only inside its folder."""
    from .errors import StepdistillError

    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise StepdistillError(f"{what} {name!r} would be written outside {root}; names must be relative and "
                               "without '..'")
    return Path(root) / name


def readable_safetensors(path: str | Path) -> dict | None:
    """The metadata of a whole safetensors file ({} when it has none), or None when it is missing or torn
    (safetensors checks the header against the file's length)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own error types for a short or corrupt file
        return None
