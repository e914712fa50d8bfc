"""Read a folder of reflow pairs (stepdistill.reflow_pairs) as a dataset of {noise, sample, condition}.

The manifest and every shard's header are checked when the folder is opened, so a missing, unfinished or
corrupt folder stops before training with the file at fault and the fix. Shards are read lazily, one example
at a time, through safetensors' memory-mapped slices, so a folder larger than memory trains as well.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import StepdistillError
from ..stages import MANIFEST

REQUIRED = ("noise", "sample")


def _fix(folder: Path) -> str:
    return (f"write it with `stepdistill reflow-pairs TEACHER --num N --out {folder}` (the same command resumes an "
            "unfinished folder)")


class PairDataset(Dataset):
    """Reflow pairs: item i is {"noise", "sample"} plus "class_labels" or "prompt" where the pairs have them."""

    has_images = False
    has_pairs = True

    def __init__(self, folder: str | Path):
        self.folder = folder = Path(folder)
        if not folder.is_dir():
            raise StepdistillError(f"reflow pairs folder {folder} does not exist; {_fix(folder)}")
        path = folder / MANIFEST
        if not path.is_file():
            raise StepdistillError(f"{folder} holds no {MANIFEST}, so it is not a reflow pairs folder; {_fix(folder)}")
        try:
            manifest = json.loads(path.read_text())
            shards = manifest["shards"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise StepdistillError(f"{path} is corrupt ({e}); delete the folder and {_fix(folder)}") from None
        if not manifest.get("complete", False):
            raise StepdistillError(f"{folder} is unfinished (its manifest is not marked complete): run the command "
                                   "that wrote it again to finish it")
        self.settings = manifest.get("settings", {})
        self.files, self.starts, self.prompts = [], [], []
        self.shape, self.has_labels = None, None
        total = 0
        for entry in shards:
            file = folder / entry["file"]
            keys, shape, meta = self._header(file, entry["count"])
            labels = "class_labels" in keys
            if self.shape is None:
                self.shape, self.has_labels = shape, labels
            elif shape != self.shape or labels != self.has_labels:
                raise StepdistillError(f"{file} holds pairs of shape {shape} (labels: {labels}), unlike the folder's "
                                       f"first shard {self.shape} (labels: {self.has_labels}); delete it and rerun")
            self.prompts.append(json.loads(meta["prompts"]) if "prompts" in meta else None)
            self.files.append(file)
            self.starts.append(total)
            total += entry["count"]
        if not total:
            raise StepdistillError(f"{folder} lists no pairs; {_fix(folder)}")
        self.total = total
        self.has_prompts = self.prompts[0] is not None
        self._handles: dict[int, object] = {}

    @staticmethod
    def _header(file: Path, count: int):
        from safetensors import safe_open

        if not file.is_file():
            raise StepdistillError(f"reflow pair shard {file} is missing; run the command that wrote the folder "
                                   "again to redo it")
        try:
            with safe_open(str(file), "pt") as f:
                keys = set(f.keys())
                meta = f.metadata() or {}
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        except Exception as e:  # safetensors raises its own error types for torn or foreign files
            raise StepdistillError(f"reflow pair shard {file} is corrupt ({e}); delete it and run the command that "
                                   "wrote the folder again to redo it") from None
        missing = [k for k in REQUIRED if k not in keys]
        if missing:
            raise StepdistillError(f"{file} lacks {missing[0]!r}: not a reflow pair shard")
        if shapes["noise"] != shapes["sample"] or shapes["noise"][0] != count:
            raise StepdistillError(f"{file} holds noise {shapes['noise']} and sample {shapes['sample']}, but the "
                                   f"manifest lists {count} pairs; delete it and rerun to redo it")
        return keys, shapes["sample"][1:], meta

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)

    def __len__(self):
        return self.total

    def _open(self, k: int):
        from safetensors import safe_open

        if k not in self._handles:
            self._handles[k] = safe_open(str(self.files[k]), "pt")
        return self._handles[k]

    def __getitem__(self, i):
        if not 0 <= i < self.total:
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        j = i - self.starts[k]
        f = self._open(k)
        item = {"noise": f.get_slice("noise")[j:j + 1][0], "sample": f.get_slice("sample")[j:j + 1][0]}
        if self.has_labels:
            item["class_labels"] = f.get_slice("class_labels")[j:j + 1][0]
        if self.prompts[k] is not None:
            item["prompt"] = self.prompts[k][j]
        return item

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}

    def check_teacher(self, teacher) -> None:
        """Refuse pairs that do not fit `teacher`: another sample shape, or conditions it does not take."""
        if self.sample_shape != tuple(teacher.sample_shape):
            raise StepdistillError(f"pairs in {self.folder} are {self.sample_shape}, but the teacher denoises "
                                   f"{tuple(teacher.sample_shape)}: make pairs from this teacher")
        kind = teacher.conditioner.kind
        if kind == "text" and not self.has_prompts:
            raise StepdistillError(f"pairs in {self.folder} hold no prompts, but the teacher is text-to-image")
        if kind == "class" and not self.has_labels:
            raise StepdistillError(f"pairs in {self.folder} hold no class_labels, but the teacher is class-conditional")

