"""The stock SDXL VAE overflows in fp16: under fp16 mixed precision a VAE whose config says so (force_upcast) stays
fp32, unless the config names an fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix); training_configs/sdxl/* are checked."""

import pytest
import torch

from stepdistill.conditioning import LatentCodec
from stepdistill.config import load_config
from stepdistill.errors import StepdistillError
from stepdistill.paths import CONFIGS
from stepdistill.teacher import frozen_dtype, load_teacher
from tiny_models import tiny_class_unet, tiny_vae

FP16_SAFE_VAES = {"madebyollin/sdxl-vae-fp16-fix"}


def _vae(force_upcast):
    vae = tiny_vae()
    vae.register_to_config(force_upcast=force_upcast)
    return vae


def test_an_fp16_overflowing_vae_stays_fp32_under_fp16():
    codec = LatentCodec(_vae(True))
    assert frozen_dtype(codec, torch.float16) == torch.float32
    assert frozen_dtype(codec, torch.bfloat16) == torch.bfloat16  # bf16 has fp32's range
    assert frozen_dtype(LatentCodec(_vae(False)), torch.float16) == torch.float16  # the fp16-fix VAE's config
    assert frozen_dtype(tiny_class_unet(), torch.float16) == torch.float16  # other frozen networks are cast


@pytest.mark.parametrize("path", sorted((CONFIGS / "sdxl").glob("*.yaml")), ids=lambda p: p.name)
def test_sdxl_configs_in_fp16_name_the_fp16_fix_vae(path):
    cfg = load_config(path)
    assert cfg.train.mixed_precision != "fp16" or cfg.vae in FP16_SAFE_VAES, (
        f"{path.name}: SDXL's own VAE overflows in fp16; set vae: madebyollin/sdxl-vae-fp16-fix or use bf16")


def test_the_config_vae_replaces_the_teachers(sd15_teacher, tmp_path):
    _vae(False).save_pretrained(tmp_path / "vae")
    teacher = load_teacher(str(sd15_teacher), vae=str(tmp_path / "vae"))
    assert teacher.pipeline.vae.config.force_upcast is False and teacher.codec.vae is teacher.pipeline.vae
    assert frozen_dtype(teacher.codec, torch.float16) == torch.float16
    assert frozen_dtype(load_teacher(str(sd15_teacher)).codec, torch.float16) == torch.float32


def test_a_vae_for_a_pixel_teacher_is_refused(class_teacher, tmp_path):
    _vae(False).save_pretrained(tmp_path / "vae")
    with pytest.raises(StepdistillError, match="has no VAE to replace; remove the vae key"):
        load_teacher(str(class_teacher), vae=str(tmp_path / "vae"))
