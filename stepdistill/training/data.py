"""Datasets (embedded digits, image-caption folders, prompt lists) and a resumable batch order.

The batch order is a pure function of (seed, micro-step): epoch e is the permutation drawn
from seed + e, and each process takes its own slice of the global batch. Resuming at any
micro-step therefore sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import StepdistillError

DIGITS_SIZE = 16  # the embedded world's image size: scikit-learn's 8x8 digits, upsampled bilinearly
DIGITS_CLASSES = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def digits_images(size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as (N, 1, size, size) images in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous(), torch.from_numpy(d.target.astype(np.int64))


class DigitsDataset(Dataset):
    """The embedded default: class-labelled 16x16 digits, shipped inside scikit-learn's wheel."""

    has_images = True

    def __init__(self, size: int = DIGITS_SIZE):
        self.images, self.labels = digits_images(size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "class_labels": self.labels[i]}


def load_image(path: Path, resolution: int | None) -> torch.Tensor:
    """An RGB image, centre-cropped and resized (None: as stored), in [-1, 1]; a corrupt file stops with its name."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise image_error(path, e) from None
    if resolution is not None:
        w, h = im.size
        side = min(w, h)
        im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        im = im.resize((resolution, resolution), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).contiguous()


WIDE_MODES = {"I;16": "16-bit grey", "I;16B": "16-bit grey", "I;16L": "16-bit grey", "I": "32-bit integer",
              "F": "32-bit float"}


def image_error(path: Path, e: Exception) -> StepdistillError:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        what = "it is not an image file"
    elif "truncat" in str(e).lower() or isinstance(e, SyntaxError):
        what = f"the file is truncated or damaged ({e})"
    else:
        what = str(e)
    return StepdistillError(f"cannot read image {path}: {what}. Remove or replace the file and run again.")


def check_image(path: Path, resolution: int | None) -> None:
    """Refuse, before training starts, a file that is no image, is torn (PIL's verify), is of a mode wider than
    8 bits (converting it to RGB would clip), or is smaller than the training resolution (it would be upscaled)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
            im.verify()
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports a short PNG chunk as SyntaxError
        raise image_error(path, e) from None
    if mode in WIDE_MODES:
        raise StepdistillError(f"image {path} has mode {mode} ({WIDE_MODES[mode]}); stepdistill reads 8-bit images: "
                               "save it as 8-bit RGB or grey and run again")
    if resolution is not None and min(size) < resolution:
        raise StepdistillError(f"image {path} is {size[0]}x{size[1]}, smaller than the training resolution "
                               f"{resolution}; use larger images or set data.resolution lower")


class ImageCaptionFolder(Dataset):
    """Images with captions: metadata.jsonl ({"file_name", "text"}) or a .txt beside each image."""

    has_images = True

    def __init__(self, root: str | Path, resolution: int):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StepdistillError(f"data.path {root} is not a folder of images")
        self.resolution = resolution
        meta = self.root / "metadata.jsonl"
        if meta.is_file():
            rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
            self.items = [(self.root / r["file_name"], r.get("text", "")) for r in rows]
        else:
            files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            self.items = [(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else "")
                          for p in files]
        missing = [str(p) for p, _ in self.items if not p.is_file()]
        if missing:
            raise StepdistillError(f"{len(missing)} images listed in {meta} are missing, e.g. {missing[0]}")
        if not self.items:
            raise StepdistillError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
        for path, _ in self.items:  # a bad file costs seconds now, not a crash hours into the run
            check_image(path, resolution)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, caption = self.items[i]
        return {"pixel_values": load_image(path, self.resolution), "prompt": caption}


class PromptList(Dataset):
    """One prompt per line, for data-free distillation."""

    has_images = False

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise StepdistillError(f"prompt file not found: {path}")
        self.prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not self.prompts:
            raise StepdistillError(f"prompt file {path} holds no prompts")

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return {"prompt": self.prompts[i]}


class ConditionsOnly(Dataset):
    """No images: class labels in turn (class-conditional teachers) or bare indices (unconditional ones), for
    data-free methods, which start from the teacher's own samples."""

    has_images = False

    def __init__(self, num_classes: int | None, size: int = 4096):
        self.num_classes, self.size = num_classes, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if self.num_classes:
            return {"class_labels": torch.tensor(i % self.num_classes)}
        return {"index": torch.tensor(i)}


def build_dataset(data_config, teacher) -> Dataset:
    """The dataset a run config names, checked against the teacher's kind."""
    kind = data_config.dataset
    if kind == "digits":
        if teacher is not None and teacher.conditioner.kind == "text":
            raise StepdistillError("data.dataset = digits is class-labelled, but the teacher is text-to-image; "
                                   "use data.dataset = folder or prompts")
        return DigitsDataset(teacher.sample_shape[-1] if teacher is not None and not teacher.codec.latent else DIGITS_SIZE)
    if kind == "folder":
        res = data_config.resolution
        if res is None:
            res = teacher.sample_shape[-1] * (8 if teacher.codec.latent else 1)
        return ImageCaptionFolder(data_config.path, res)
    if kind == "prompts":
        return PromptList(data_config.path)
    if kind == "pairs":
        from .pairs import PairDataset

        pairs = PairDataset(data_config.path)
        if teacher is not None:
            pairs.check_teacher(teacher)
        return pairs
    if teacher is not None and teacher.conditioner.kind == "text":
        raise StepdistillError("data.dataset = none gives no prompts to a text-to-image teacher; use "
                               "data.dataset = prompts with data.path = a file of prompts")
    return ConditionsOnly(getattr(teacher.conditioner, "num_classes", None) if teacher is not None else None)


class StepBatchSampler(Sampler):
    """Yields this process's index lists from micro-step `start` on, forever, in a seeded order."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world = rank, world

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(self.n)

    def __iter__(self):
        global_bs = self.batch_size * self.world
        pos = self.start * global_bs
        epoch, cached = -1, None
        while True:
            idx = []
            for p in range(pos, pos + global_bs):
                e = p // self.n
                if e != epoch:
                    epoch, cached = e, self._perm(e)
                idx.append(int(cached[p % self.n]))
            pos += global_bs
            yield idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self):  # infinite; DataLoader only needs this for its length
        return 2**62


def batch_iterator(dataset: Dataset, batch_size: int, seed: int, start: int, rank: int, world: int,
                   num_workers: int = 0):
    """An endless iterator of batches, starting at micro-step `start`."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, rank, world)
    # its own generator: creating the iterator must not draw from the global RNG (exact resume)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
    return iter(loader)
