"""What `stepdistill fid` measures: image folders, the embedded digits, and pipelines sampled on the fly.

Every source hands out uint8 N x C x H x W batches by global batch index, so the same code reads, generates,
splits work across processes and feeds torch-fidelity's extractors. Sources that hold fixed images also
give a content hash, the key under which their statistics are cached.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import StepdistillError
from ..training.data import IMAGE_SUFFIXES, load_image
from ..training.grid import to_uint8


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W), rounded as PNG files store them."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`: independent of batch size and process count."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ImageSource:
    """A fixed, ordered set of images; `batch(j, b)` is images j*b .. j*b+b-1."""

    label = "images"

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, j: int, batch_size: int) -> torch.Tensor:
        raise NotImplementedError

    def content_key(self) -> str | None:
        """A hash of everything the images depend on, or None when they are not worth caching."""
        return None

    def prompts(self, start: int, num: int) -> list[str] | None:
        """The prompts behind images start .. start+num-1, for CLIP score; None when there are none."""
        return None


class TensorSource(ImageSource):
    """Images already in memory (uint8), e.g. the embedded digits."""

    def __init__(self, images: torch.Tensor, label: str, key: str | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("TensorSource takes uint8 N x C x H x W")
        self.images, self.label, self._key = images, label, key

    def __len__(self):
        return len(self.images)

    def batch(self, j, batch_size):
        return self.images[j * batch_size:(j + 1) * batch_size]

    def content_key(self):
        if self._key is None:
            h = hashlib.sha256(str(tuple(self.images.shape)).encode())
            h.update(self.images.numpy().tobytes())
            self._key = h.hexdigest()
        return self._key


def digits_source(resolution: int | None = None) -> TensorSource:
    """All 1,797 embedded digits (16x16 unless `resolution`), the reference of the digits world."""
    from ..training.data import DIGITS_SIZE, digits_images

    size = resolution or DIGITS_SIZE
    images, _ = digits_images(size)
    return TensorSource(to_uint8_nchw(images), f"digits{size}")


class FolderSource(ImageSource):
    """The images directly inside a folder (sorted by name), optionally centre-cropped and resized."""

    def __init__(self, path: str | Path, resolution: int | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise StepdistillError(f"image folder {path} does not exist")
        if not self.path.is_dir():
            raise StepdistillError(f"{path} is neither a folder of images, a pipeline directory, 'digits', "
                                   "nor a statistics file (.safetensors)")
        self.files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise StepdistillError(f"no images ({', '.join(IMAGE_SUFFIXES)}) directly inside {path}")
        self.resolution = resolution
        self.label = self.path.name
        self._key = None

    def __len__(self):
        return len(self.files)

    def batch(self, j, batch_size):
        files = self.files[j * batch_size:(j + 1) * batch_size]
        images = [to_uint8_nchw(load_image(f, self.resolution)[None])[0] for f in files]
        for f, im in zip(files, images):
            if im.shape != images[0].shape:
                raise StepdistillError(f"images differ in size: {files[0]} is {tuple(images[0].shape[1:])}, {f} is "
                                       f"{tuple(im.shape[1:])}; pass --resolution N to centre-crop and resize them all")
        return torch.stack(images)

    def content_key(self):
        if self._key is None:
            h = hashlib.sha256(f"folder:{self.resolution}".encode())
            for f in self.files:
                h.update(f.name.encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
            self._key = h.hexdigest()
        return self._key


class GeneratedSource(ImageSource):
    """`num` samples of `make(start, n, generators) -> (n, C, H, W) in [-1, 1]`, one seeded generator per
    sample, so sample i is the same whatever the batch size or number of processes. Samples can be kept as PNG."""

    def __init__(self, make: Callable, num: int, label: str, seed: int = 0, save_dir: str | Path | None = None,
                 prompts: list[str] | None = None, generator_device="cpu", key: str | None = None):
        if num < 1:
            raise StepdistillError(f"--num-samples must be at least 1, got {num}")
        self.make, self.num, self.label, self.seed, self._key = make, num, label, seed, key
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self._prompts = prompts
        self.generator_device = generator_device

    def __len__(self):
        return self.num

    def batch(self, j, batch_size):
        start = j * batch_size
        n = min(batch_size, self.num - start)
        gens = [torch.Generator(self.generator_device).manual_seed(sample_seed(self.seed, i))
                for i in range(start, start + n)]
        images = to_uint8_nchw(self.make(start, n, gens))
        if self.save_dir is not None:
            save_pngs(images, self.save_dir, start)
        return images

    def content_key(self):
        return None if self.save_dir is not None else self._key  # a cache hit would skip writing the samples

    def prompts(self, start, num):
        if not self._prompts:
            return None
        return [self._prompts[i % len(self._prompts)] for i in range(start, start + num)]


def save_pngs(images: torch.Tensor, folder: Path, start: int) -> None:
    """uint8 (N, C, H, W) -> folder/000123.png (gray when C is 1), numbered by sample index."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = images.permute(0, 2, 3, 1).numpy()
    for k, a in enumerate(arr):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"{start + k:06d}.png")


def read_prompts(path: str | Path) -> list[str]:
    from ..training.data import PromptList

    return PromptList(path).prompts


def pipeline_source(path: str | Path, num: int, steps: int | None = None, seed: int = 0, guidance: float | None = None,
                    classes: list[int] | None = None, prompts_file: str | None = None, device="cpu",
                    dtype: torch.dtype | None = None, save_dir=None, label: str | None = None):
    """A pipeline directory (or hub id) sampled `num` times; returns (source, description dict)."""
    from ..sampling import default_steps, pipeline_conditions, pipeline_images, pipeline_kind
    from ..teacher import load_pipeline

    pipe = load_pipeline(str(path), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    kind = pipeline_kind(pipe)
    if classes and kind != "class":
        raise StepdistillError(f"--classes given, but {path} ({type(pipe).__name__}) is not class-conditional")
    if classes and any(not 0 <= c < pipe.config.num_classes for c in classes):
        raise StepdistillError(f"--classes {classes}: {path} has classes 0 .. {pipe.config.num_classes - 1}")
    prompts = None
    if prompts_file is not None:
        if kind != "text":
            raise StepdistillError(f"--prompts given, but {path} ({type(pipe).__name__}) takes no text")
        prompts = read_prompts(prompts_file)
    elif kind == "text":
        raise StepdistillError(f"{path} is a text-to-image pipeline: pass --prompts FILE (one prompt per line)")
    steps = steps or default_steps(pipe, Path(path))
    key = None
    if Path(path).is_dir():  # samples of a local pipeline are a pure function of its files and these settings
        from .fid import weights_sha256

        h = hashlib.sha256(repr((steps, num, seed, guidance, classes, prompts, str(dtype))).encode())
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
            h.update(str(f.relative_to(path)).encode() + weights_sha256(f).encode())
        key = h.hexdigest()

    def make(start, n, generators):
        return pipeline_images(pipe, n, steps, generators, guidance,
                               pipeline_conditions(pipe, start, n, classes, prompts)).float()

    desc = {"model": label or Path(str(path)).name, "sampler": type(pipe.scheduler).__name__, "steps": steps,
            "num_samples": num, "seed": seed}
    if guidance is not None:
        desc["guidance"] = guidance
    return GeneratedSource(make, num, desc["model"], seed, save_dir, prompts, key=key), desc
