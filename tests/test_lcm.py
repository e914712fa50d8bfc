"""LCM: the w-embedding, LoRA students through peft, LCM-LoRA on tiny SD1.5 / SDXL pipelines loaded back in plain
diffusers, LPIPS, data-free prompt batches."""

import sys
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from distiller_suite import DistillerSuite
from helpers import assert_pipeline_matches_own_sampler, tiny_config
from stepdistill.errors import ConfigError, StepdistillError
from stepdistill.lora import has_lora
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.runner import build, run

LORA = ["distill.lora_rank=4", "distill.lora_alpha=8"]  # alpha != rank: the export must carry the scale


def _folder(request):
    return ["data.dataset=folder", f"data.path={request.getfixturevalue('caption_folder')}", "data.resolution=16"]


def test_w_embedding_student_matches_plain_pipeline(class_teacher, tmp_path):
    """The guidance scale reaches the student as timestep_cond; the exported pipeline embeds the same w - 1."""
    trainer = run(tiny_config("digits/lcm.yaml", class_teacher, tmp_path, "train.max_steps=2"))
    d = trainer.distiller
    assert d.student.config.time_cond_proj_dim == 256
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert_pipeline_matches_own_sampler(trainer, pipe, (1, 4), own_kwargs={"guidance_scale": 1.7},
                                        pipe_kwargs={"guidance_scale": 1.7})


def test_guided_teacher_step_uses_diffusers_convention(class_teacher, tmp_path):
    d = build(tiny_config("digits/lcm.yaml", class_teacher, tmp_path, "distill.guidance_scale_min=2",
                          "distill.guidance_scale_max=2"))[1]
    w = d.draw_guidance(3, "cpu")
    torch.testing.assert_close(w, torch.full((3,), 2.0))
    emb = d.student_cond({"class_labels": torch.tensor([1, 2, 3])}, w, 3)["timestep_cond"]
    from stepdistill.conditioning import guidance_embedding

    torch.testing.assert_close(emb, guidance_embedding(torch.full((3,), 1.0), 256))  # LCM's w = scale - 1


def test_lora_student_trains_only_adapters_and_shares_frozen_weights(class_teacher, tmp_path):
    trainer = run(tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=2", *LORA))
    student = trainer.distiller.student
    assert has_lora(student)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    target = trainer.ema.module("student", "target")
    base = "conv_in.weight"
    assert dict(target.named_parameters())[base] is dict(student.named_parameters())[base]  # EMA shares the base
    # the export merged the adapters (a plain UNet), and its lora/ loads into the teacher pipeline
    merged = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert not has_lora(merged.unet)
    loaded = ClassConditionalPipeline.from_pretrained(class_teacher)
    loaded.load_lora_weights(tmp_path / "student" / "lora")
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([500, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        expected = trainer.export_networks()["student"](x, t, None, class_labels=labels).sample
        assert not torch.allclose(expected, loaded.unet(x, t, None, class_labels=labels).sample * 0)
        for unet in (merged.unet, loaded.unet):
            torch.testing.assert_close(unet(x, t, None, class_labels=labels).sample, expected, atol=1e-5, rtol=1e-5)


def test_lora_rejects_w_embedding_and_bad_targets(class_teacher, tmp_path):
    with pytest.raises(ConfigError, match="guidance_embedding"):
        tiny_config("digits/lcm.yaml", class_teacher, tmp_path, "distill.lora_rank=4")
    with pytest.raises(ConfigError, match="match no layer"):
        build(tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "distill.lora_rank=4",
                          "distill.lora_target_modules=[nonexistent]"))


def _plain_lora_pipeline(cls, teacher, student_dir):
    pipe = cls.from_pretrained(teacher)
    pipe.scheduler = LCMScheduler.from_pretrained(student_dir, subfolder="scheduler")
    pipe.load_lora_weights(student_dir / "lora")
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lcm_lora_loads_in_plain_diffusers_and_matches_own_sampler(arch, request, tmp_path):
    """LCM-LoRA from the real sd15/sdxl config: load_lora_weights + fuse_lora in plain diffusers give the
    student's own 4-step samples from the same noise (latents compared), as does the merged export."""
    teacher = request.getfixturevalue(f"{arch}_teacher")
    cfg = tiny_config(f"{arch}/lcm_lora.yaml", teacher, tmp_path, "train.max_steps=2", "train.mixed_precision='no'",
                      "train.batch_size=2", *LORA, *_folder(request))
    trainer = run(cfg)
    d = trainer.distiller
    student_dir = Path(cfg.output_dir) / "student"
    assert (student_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    cls = StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline
    prompts = ["a red cat", "a photo of the dog"]
    cond = d.teacher_info.conditioner.encode({"prompt": prompts}, "cpu")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    ours = d.sample(noise, cond, 4, generator=g, networks=trainer.export_networks())
    for pipe in (_plain_lora_pipeline(cls, teacher, student_dir), cls.from_pretrained(student_dir)):
        assert isinstance(pipe.scheduler, LCMScheduler)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        theirs = pipe(prompt=prompts, num_inference_steps=4, latents=noise, generator=g, guidance_scale=1.0,
                      output_type="latent").images
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)


def test_lpips_loss_decodes_latents(sd15_teacher, request, tmp_path):
    cfg = tiny_config("sd15/lcm_lora.yaml", sd15_teacher, tmp_path, "train.max_steps=1", "train.mixed_precision='no'",
                      "train.batch_size=2", "distill.loss=lpips", *LORA, *_folder(request))
    trainer = run(cfg)
    assert trainer.logs["loss/student"] > 0 and trainer.logs["grad_norm/student"] > 0


def test_lpips_without_assets_is_a_clear_error(class_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_ASSETS", str(tmp_path))
    with pytest.raises(StepdistillError, match="lpips-alexnet-features.safetensors"):
        build(tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "distill.loss=lpips"))


def test_data_free_prompt_batches(sd15_teacher, prompt_file, tmp_path):
    """Prompt-only data: x_{t_n} comes from the guided teacher run from pure noise."""
    cfg = tiny_config("sd15/lcm_lora.yaml", sd15_teacher, tmp_path, "train.max_steps=2", "train.mixed_precision='no'",
                      "train.batch_size=2", "data.dataset=prompts", f"data.path={prompt_file}", *LORA)
    d = build(cfg)[1]
    cond = d.teacher_info.conditioner.encode({"prompt": ["a cat", "a dog"]}, "cpu")
    t = torch.tensor([1.0, 0.3])
    torch.manual_seed(0)
    x = d.data_free_start(2, t, cond, torch.tensor([3.0, 3.0]))
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(x[0], z[0])  # at t = 1 it is the noise itself
    assert not torch.allclose(x[1], z[1])
    assert run(cfg).logs["loss/student"] > 0


class TestLCMSuite(DistillerSuite):
    config_file = "digits/lcm.yaml"


class TestSD15LCMLoRASuite(DistillerSuite):
    config_file = "sd15/lcm_lora.yaml"
    teacher = "sd15_teacher"
    overrides = ("train.mixed_precision='no'", "train.batch_size=2", *LORA)

    @classmethod
    def extra_overrides(cls, request):
        return _folder(request)


def test_lora_only_export_writes_adapters_and_scheduler(sd15_teacher, request, tmp_path):
    cfg = tiny_config("sd15/lcm_lora.yaml", sd15_teacher, tmp_path, "train.max_steps=1", "train.mixed_precision='no'",
                      "train.batch_size=2", "export.lora_only=true", *LORA, *_folder(request))
    run(cfg)
    student = Path(cfg.output_dir) / "student"
    assert (student / "pytorch_lora_weights.safetensors").is_file() and not (student / "model_index.json").exists()
    assert LCMScheduler.from_pretrained(student, subfolder="scheduler").config.original_inference_steps == 50
    pipe = StableDiffusionPipeline.from_pretrained(sd15_teacher)
    pipe.load_lora_weights(student)
    assert "load_lora_weights" in (student / "README.md").read_text()


def _run_script(name: str, args: list[str], monkeypatch) -> int:
    """Run scripts/<name>.py as `python scripts/<name>.py ARGS` would; returns its exit status."""
    import runpy

    from stepdistill.paths import PROJECT_ROOT

    path = PROJECT_ROOT / "scripts" / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")
    return exit_.value.code


def test_train_consistency_script(class_teacher, tmp_path, monkeypatch, capsys):
    from stepdistill.paths import PROJECT_ROOT

    args = ["--config", str(PROJECT_ROOT / "training_configs/digits/tcd.yaml"), f"teacher={class_teacher}",
            f"output_dir={tmp_path}", "train.max_steps=1", "train.batch_size=4", "train.report_to=none",
            "train.progress_bar=false", "train.num_sample_images=2"]
    assert _run_script("train_consistency", args, monkeypatch) == 0
    assert (tmp_path / "student" / "model_index.json").is_file()
    assert _run_script("train_consistency", [*args, "distill.gamma=2"], monkeypatch) == 2  # message, no traceback
    assert "gamma" in capsys.readouterr().err
    progressive = ["--config", str(PROJECT_ROOT / "training_configs/digits/progressive.yaml"),
                   f"teacher={class_teacher}", f"output_dir={tmp_path / 'p'}"]
    assert _run_script("train_consistency", progressive, monkeypatch) == 2  # another family's config
    assert "not one of this script's" in capsys.readouterr().err
    assert _run_script("train_progressive", args, monkeypatch) == 2  # and the other way round
    assert "use `stepdistill train" in capsys.readouterr().err


class TestSDXLLCMLoRASuite(DistillerSuite):
    config_file = "sdxl/lcm_lora.yaml"
    teacher = "sdxl_teacher"
    overrides = ("train.mixed_precision='no'", "train.batch_size=2", *LORA)

    @classmethod
    def extra_overrides(cls, request):
        return _folder(request)
