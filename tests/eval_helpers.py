"""Shared pieces of the evaluation tests: image folders, the offline Inception file, tiny CLIP and text pipelines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from stepdistill.eval.sources import save_pngs, to_uint8_nchw
from stepdistill.training.data import digits_images


def inception_asset() -> Path:
    """inception-2015-12-05-fid.pt from $STEPDISTILL_ASSETS, else from ../shared/assets beside the checkout
    (where CI keeps it; see .ci/run)."""
    folder = os.environ.get("STEPDISTILL_ASSETS") or Path(__file__).resolve().parents[2] / "shared" / "assets"
    path = Path(folder) / "inception-2015-12-05-fid.pt"
    if not path.is_file():
        pytest.fail(f"{path} is not here: set STEPDISTILL_ASSETS to the folder holding the FID Inception "
                    "TorchScript file (CI: ../shared/assets; see its README)")
    return path


def digits_folder(folder: Path, index, noise: float = 0.0, seed: int = 0) -> Path:
    """Embedded digits `index` (optionally noised) written as gray PNGs."""
    x, _ = digits_images()
    x = x[list(index)]
    if noise:
        x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    save_pngs(to_uint8_nchw(x), folder, 0)
    return folder


def colour_folder(folder: Path, n: int, seed: int, size: int = 32) -> Path:
    """Smooth random RGB images (upsampled noise), so Inception sees some structure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=(size, size), mode="bilinear")
    save_pngs(to_uint8_nchw(x), folder, 0)
    return folder


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def save_tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over single letters (no merges), written as vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    tok.save_pretrained(folder)
    return tok


def text_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def save_tiny_clip(folder: Path) -> Path:
    """A random CLIPModel (text + 32x32 vision towers) with its tokenizer, saved as safetensors."""
    from transformers import CLIPConfig, CLIPModel

    tok = save_tiny_tokenizer(folder)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=text_config(len(tok)), projection_dim=8,
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2))
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def save_tiny_text_pipeline(folder: Path) -> Path:
    """A tiny StableDiffusionPipeline (16x16 RGB through a 2-block VAE), saved as safetensors."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from tiny_models import tiny_text_unet, vp_scheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = save_tiny_tokenizer(folder / "_tok")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(len(tok))))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=tiny_text_unet(),
                                   scheduler=vp_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
