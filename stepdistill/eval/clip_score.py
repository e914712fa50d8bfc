"""CLIP score of text-to-image samples: 100 * max(cos(image, prompt), 0), averaged (torchmetrics' convention).

The CLIP model is a transformers CLIPModel directory (safetensors) or hub id; nothing is fetched unless the
user names a hub id and is online.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import StepdistillError


class CLIPScorer:
    """Per-image CLIP scores, batch by batch, so samples never need to be kept."""

    def __init__(self, model_path: str | Path, device="cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = Path(model_path).expanduser()
        if str(model_path).startswith((".", "/", "~")) and not path.is_dir():
            raise StepdistillError(f"--clip-model {model_path} is not a directory (expected a CLIPModel saved with "
                                   "save_pretrained)")
        try:
            self.model = CLIPModel.from_pretrained(str(model_path), use_safetensors=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        except (OSError, ValueError) as e:
            raise StepdistillError(f"could not load CLIP model {model_path}: {e}") from None
        size = self.model.config.vision_config.image_size
        if (path / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(str(path))
        else:  # OpenAI CLIP's preprocessing at this model's input size
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """uint8 (N, C, H, W) images and their N prompts -> (N,) scores."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        pixels = self.processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        text = {k: v.to(self.device) for k, v in text.items() if k in ("input_ids", "attention_mask")}
        out = self.model(**text, pixel_values=pixels.to(self.device, self.model.dtype))
        cos = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)
        return (100 * cos).clamp(min=0).cpu()
