"""The catalogue of bad inputs: each, through `stepdistill.cli.main`, gives one clear line on stderr (what, where,
how to fix), no traceback, exit code 2, and touches no file of the user's. docs/errors.md is this table
(`python tests/test_error_catalogue.py` rewrites it; a test checks it matches)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from stepdistill.cli import main
from stepdistill.paths import CONFIGS

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
CD = str(CONFIGS / "digits/consistency.yaml")
FAST = ["train.progress_bar=false", "train.report_to=none", "train.batch_size=4"]


@dataclass
class Case:
    id: str
    what: str
    argv: Callable  # env -> argv after the program name
    expect: str  # the start of the message after "error: ", with {placeholders} from env


def train(*extra, teacher="class_teacher", config=CD):
    return lambda e: ["train", config.format(**vars(e)), f"teacher={getattr(e, teacher)}", f"output_dir={e.out}",
                      *FAST, *(x.format(**vars(e)) for x in extra)]


CASES = [
    # config keys, types and ranges
    Case("unknown-key", "unknown config key, with a did-you-mean", train("train.learning_rat=1e-4"),
         "unknown config key 'train.learning_rat'; did you mean 'learning_rate'? Valid keys here:"),
    Case("unknown-section", "unknown config section", train("trian.max_steps=5"),
         "unknown config key 'trian'; did you mean 'train'? Valid keys here:"),
    Case("unknown-method-key", "unknown key of the method's own section", train("distill.los=l2"),
         "unknown config key 'distill.los'; did you mean 'loss'? Valid keys here:"),
    Case("int-type", "a word where an integer goes", train("train.max_steps=many"),
         "train.max_steps = 'many' should be an integer"),
    Case("float-type", "a word where a number goes", train("train.learning_rate=fast"),
         "train.learning_rate = 'fast' should be a number"),
    Case("bool-type", "a word where true/false goes", train("train.progress_bar=maybe"),
         "train.progress_bar = 'maybe' should be true or false"),
    Case("choice", "a value outside the allowed choices", train("train.mixed_precision=fp8"),
         "train.mixed_precision = 'fp8' is not allowed; choose one of ['no', 'fp16', 'bf16']"),
    Case("list-type", "a scalar where a list goes", train("train.ema_decays=0.99"),
         "train.ema_decays = 0.99 should be a list"),
    Case("zero-steps", "zero training steps", train("train.max_steps=0"),
         "train.max_steps = 0 is out of range; allowed: [1, inf]"),
    Case("negative-batch", "a negative batch size", train("train.batch_size=-4"),
         "train.batch_size = -4 is out of range; allowed: [1, inf]"),
    Case("beta-one", "an Adam beta of 1", train("train.adam_beta2=1"),
         "train.adam_beta2 = 1 never forgets; use a value below 1"),
    Case("ema-range", "an EMA decay above 1", train("train.ema_decays=[1.5]"),
         "train.ema_decays[] = 1.5 is out of range; allowed: [0, 1]"),
    Case("export-steps", "zero export steps", train("export.steps=[0]"),
         "export.steps = [0]: give a non-empty list of positive step counts"),
    Case("nonfinite-limit", "a zero NaN/inf tolerance", train("train.max_consecutive_nonfinite=0"),
         "train.max_consecutive_nonfinite = 0 is out of range; allowed: [1, inf]"),
    Case("unknown-method", "a method that does not exist", train("method=dmd9"),
         "unknown method 'dmd9'; available:"),
    Case("override-syntax", "an override without '='", train("train.max_steps"),
         "override 'train.max_steps' should look like key.sub=value"),
    Case("config-missing", "a config file that does not exist", lambda e: ["train", f"{e.tmp}/nope.yaml"],
         "config file not found: {tmp}/nope.yaml"),
    Case("config-yaml", "a config file that is not YAML", lambda e: ["train", e.bad_yaml],
         "{bad_yaml} is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1; fix the "
         "file's syntax"),
    Case("config-list", "a config file holding a list", lambda e: ["train", e.list_yaml],
         "{list_yaml} should hold a mapping of config sections"),
    Case("unknown-group", "train.groups naming no network", train("train.groups.critic.learning_rate=1e-5"),
         "train.groups.critic: cd has no trainable network of that name; its networks are student"),
    # teachers
    Case("teacher-missing", "a teacher path that does not exist", train(teacher="missing_teacher"),
         "teacher '{missing_teacher}' not found: give a pipeline directory that exists or a hub id"),
    Case("teacher-file", "a single-file checkpoint as the teacher", train(teacher="file_teacher"),
         "{file_teacher} is a single file; stepdistill needs a diffusers pipeline directory"),
    Case("teacher-no-index", "a folder that is no pipeline", train(teacher="tmp"),
         "{tmp} is not a diffusers pipeline directory (no model_index.json)"),
    Case("teacher-index-json", "a pipeline whose model_index.json is not JSON", train(teacher="badindex_teacher"),
         "{badindex_teacher}/model_index.json is not valid JSON (Expecting value: line 1 column 17 (char 16)); save "
         "the pipeline again with save_pretrained"),
    Case("teacher-pickle", "a teacher with only pickle weights", train(teacher="pickle_teacher"),
         "teacher component 'unet' in {pickle_teacher} has only pickle weights (diffusion_pytorch_model.bin); "
         "stepdistill loads safetensors only."),
    Case("teacher-corrupt", "a corrupt safetensors file in the teacher", train(teacher="corrupt_teacher"),
         "{corrupt_teacher}/unet/diffusion_pytorch_model.safetensors is not a whole safetensors file (corrupt or cut "
         "short); copy or download it again"),
    Case("teacher-truncated", "a truncated safetensors file in the teacher", train(teacher="truncated_teacher"),
         "{truncated_teacher}/unet/diffusion_pytorch_model.safetensors is not a whole safetensors file"),
    Case("vae-missing", "a vae that does not exist", train("vae={tmp}/no-vae", teacher="sd15_teacher"),
         "vae '{tmp}/no-vae' not found: give an AutoencoderKL folder or a hub id like 'org/name'"),
    Case("vae-pixel-teacher", "a vae for a teacher without one", train("vae={vae_dir}"),
         "vae = {vae_dir}: the teacher {class_teacher} has no VAE to replace; remove the vae key"),
    # data
    Case("data-path-missing", "an image folder that does not exist",
         train("data.dataset=folder", "data.path={tmp}/nowhere", teacher="uncond_teacher"),
         "data.path {tmp}/nowhere is not a folder of images"),
    Case("data-no-path", "an image dataset without data.path", train("data.dataset=folder"),
         "data.dataset = 'folder' needs data.path (a folder or a prompt file)"),
    Case("data-empty-folder", "an image folder with no images",
         train("data.dataset=folder", "data.path={empty_dir}", teacher="uncond_teacher"),
         "no images (.png, .jpg, .jpeg, .webp, .bmp) found in {empty_dir}"),
    Case("data-non-image", "an image folder holding a file that is no image",
         train("data.dataset=folder", "data.path={nonimage_dir}", teacher="uncond_teacher"),
         "cannot read image {nonimage_dir}/b.png: it is not an image file"),
    Case("data-truncated-image", "an image folder holding a truncated image",
         train("data.dataset=folder", "data.path={truncated_dir}", teacher="uncond_teacher"),
         "cannot read image {truncated_dir}/b.png: the file is truncated or damaged"),
    Case("data-small-image", "images smaller than the training resolution",
         train("data.dataset=folder", "data.path={small_dir}", teacher="uncond_teacher"),
         "image {small_dir}/a.png is 4x4, smaller than the training resolution 8"),
    Case("data-mode", "a 16-bit or float image (mode not 8-bit)",
         train("data.dataset=folder", "data.path={mode_dir}", teacher="uncond_teacher"),
         "image {mode_dir}/a.png has mode I;16 (16-bit grey); stepdistill reads 8-bit images"),
    Case("prompts-empty", "an empty prompt file", train("data.dataset=prompts", "data.path={empty_prompts}"),
         "prompt file {empty_prompts} holds no prompts"),
    Case("prompts-missing", "a prompt file that does not exist", train("data.dataset=prompts", "data.path={tmp}/p.txt"),
         "prompt file not found: {tmp}/p.txt"),
    Case("digits-text-teacher", "class-labelled data for a text-to-image teacher",
         train(teacher="sd15_teacher"), "data.dataset = digits is class-labelled, but the teacher is text-to-image"),
    # method against teacher
    Case("guidance-uncond", "guidance distillation of a teacher without a null condition",
         train(teacher="uncond_teacher", config=str(CONFIGS / "digits/guidance.yaml")),
         "guidance distillation needs a conditional teacher with a null condition"),
    Case("guidance-scale-uncond", "a guidance scale range on a teacher without a null condition",
         train("distill.guidance_scale_min=2.0", "distill.guidance_scale_max=4.0", teacher="uncond_teacher"),
         "distill.guidance_scale_min/max other than 1 need a conditional teacher with a null condition"),
    Case("w-embedding-unet2d", "LCM's w-embedding on a teacher network without a time-condition input",
         train(teacher="uncond_teacher", config=str(CONFIGS / "digits/lcm.yaml")),
         "distill.guidance_embedding needs a teacher network that takes a w-embedding (time_cond_proj_dim, as "
         "UNet2DConditionModel); UNet2DModel has none: set distill.guidance_embedding = false"),
    Case("output-other-config", "an output folder holding a run of the same method with other settings",
         lambda e: ["train", CD, f"teacher={e.class_teacher}", f"output_dir={e.other_cd_run}", "distill.loss=l2",
                    *FAST],
         "output_dir {other_cd_run} holds another run (distill.loss = 'lpips', not 'l2'); choose another "
         "output_dir, or delete that folder to start over"),
    Case("images-data-free", "a method that trains on images with data.dataset = none",
         train("data.dataset=none", "distill.round=1", "distill.start_steps=8",
               config=str(CONFIGS / "digits/progressive.yaml")),
         "method 'progressive' trains on images, and data.dataset = 'none' has none"),
    Case("lora-target", "a LoRA target module that does not exist",
         train("distill.lora_rank=4", "distill.lora_target_modules=[no_such_layer]", "distill.guidance_embedding=false",
               config=str(CONFIGS / "digits/lcm.yaml")),
         "distill.lora_target_modules ['no_such_layer'] match no layer of UNet2DConditionModel"),
    # resume and output folders
    Case("resume-not-checkpoint", "train.resume pointing at no checkpoint", train("train.resume={tmp}"),
         "train.resume = {tmp}: not a checkpoint folder (no state.json)"),
    Case("resume-other-method", "a resume from another method's checkpoint", train("train.resume={foreign_ckpt}"),
         "{foreign_ckpt}: the checkpoint lacks 125 trainable weights (e.g. student/conv_in.weight): it is from "
         "another method or config"),
    Case("output-other-run", "an output folder that holds another run",
         lambda e: ["train", CD, f"teacher={e.class_teacher}", f"output_dir={e.other_run}", *FAST],
         "output_dir {other_run} holds another run (method lcm, not cd); choose another output_dir, or delete that "
         "folder to start over"),
    # sampling and export
    Case("sample-zero-steps", "zero sampling steps", lambda e: ["sample", e.class_teacher, "--steps", "0"],
         "--steps 0 --num 16: sampling needs at least 1 step and 1 image"),
    Case("sample-negative-steps", "negative sampling steps", lambda e: ["sample", e.class_teacher, "--steps", "-3"],
         "--steps -3 --num 16: sampling needs at least 1 step and 1 image"),
    Case("sample-zero-images", "zero images to sample", lambda e: ["sample", e.class_teacher, "--num", "0"],
         "--steps None --num 0: sampling needs at least 1 step and 1 image"),
    Case("sample-guidance-uncond", "a guidance scale on a teacher without a null condition",
         lambda e: ["sample", e.uncond_teacher, "--steps", "2", "--guidance", "3", "--out", f"{e.tmp}/g.png"],
         "--guidance 3.0 needs a conditional pipeline with a null condition (classifier-free guidance); "
         "{uncond_teacher} is unconditional: leave --guidance out"),
    Case("sample-missing", "sampling a pipeline that does not exist", lambda e: ["sample", f"{e.tmp}/nope"],
         "teacher '{tmp}/nope' not found"),
    Case("export-no-run", "exporting a folder that is no run", lambda e: ["export", e.tmp],
         "{tmp} is not a training output folder (no config.yaml); pass the output_dir of a `stepdistill train` run"),
    Case("export-zero-steps", "exporting with zero steps", lambda e: ["export", e.tmp, "--steps", "0"],
         "--steps 0: a student samples in at least 1 step"),
    Case("export-no-checkpoint", "exporting a run without checkpoints", lambda e: ["export", e.other_run_nockpt],
         "{other_run_nockpt} has no checkpoints to export"),
]


def _snapshot(paths) -> dict:
    out = {}
    for root in paths:
        root = Path(root)
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if p.is_file():
                st = p.stat()
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode)
            elif p.exists():
                out[str(p)] = ("dir", sorted(c.name for c in p.iterdir()))
    return out


def _png(path, size=8, mode="RGB"):
    from PIL import Image
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full((size, size), 40000, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, (size, size), 128).save(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, class_teacher, uncond_teacher, sd15_teacher):
    """Every broken input of the table, made once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    e = {"class_teacher": str(class_teacher), "uncond_teacher": str(uncond_teacher), "sd15_teacher": str(sd15_teacher)}
    e["missing_teacher"] = str(root / "no-teacher")
    (root / "teacher.safetensors").write_bytes(b"x" * 64)
    e["file_teacher"] = str(root / "teacher.safetensors")

    def broken(name, edit):
        path = root / name
        shutil.copytree(class_teacher, path)
        edit(path)
        e[name] = str(path)

    weights = "unet/diffusion_pytorch_model.safetensors"
    broken("pickle_teacher", lambda p: (p / weights).rename(p / "unet/diffusion_pytorch_model.bin"))
    broken("corrupt_teacher", lambda p: (p / weights).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 8))
    broken("truncated_teacher", lambda p: (p / weights).write_bytes((p / weights).read_bytes()[:-100]))
    broken("badindex_teacher", lambda p: (p / "model_index.json").write_text("{\"_class_name\": "))
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "list.yaml").write_text("- method: cd\n")
    e["bad_yaml"], e["list_yaml"] = str(root / "bad.yaml"), str(root / "list.yaml")
    (root / "empty").mkdir()
    e["empty_dir"] = str(root / "empty")
    _png(root / "nonimage" / "a.png")
    (root / "nonimage" / "b.png").write_text("these are notes, not an image")
    e["nonimage_dir"] = str(root / "nonimage")
    _png(root / "truncated" / "a.png", 32)
    full = _png(root / "truncated" / "b.png", 32).read_bytes()
    (root / "truncated" / "b.png").write_bytes(full[: len(full) // 2])
    e["truncated_dir"] = str(root / "truncated")
    _png(root / "small" / "a.png", 4)
    e["small_dir"] = str(root / "small")
    _png(root / "mode" / "a.png", 8, "I;16")
    e["mode_dir"] = str(root / "mode")
    (root / "prompts.txt").write_text("\n  \n\n")
    e["empty_prompts"] = str(root / "prompts.txt")
    from tiny_models import tiny_vae

    tiny_vae().save_pretrained(root / "vae")
    e["vae_dir"] = str(root / "vae")
    foreign = root / "foreign" / "step-00000002"
    foreign.mkdir(parents=True)
    from safetensors.torch import save_file
    import torch

    save_file({"critic/0.weight": torch.zeros(2)}, str(foreign / "weights.safetensors"))
    (foreign / "state.json").write_text(json.dumps({"counters": {"step": 2, "micro_step": 2}, "optimizers": {},
                                                    "schedulers": {}}))
    e["foreign_ckpt"] = str(foreign)
    for name, ckpt, method in (("other_run", True, "lcm"), ("other_run_nockpt", False, "lcm"),
                               ("other_cd_run", True, "consistency")):
        run = root / name
        (run / "checkpoints" / "step-00000003").mkdir(parents=True) if ckpt else run.mkdir()
        from stepdistill.config import load_config, to_dict
        import yaml

        cfg = load_config(CONFIGS / f"digits/{method}.yaml", [f"teacher={class_teacher}", f"output_dir={run}",
                                                              *(["distill.loss=lpips"] if method != "lcm" else [])])
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        e[name] = str(run)
    return e


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line(case, inputs, tmp_path, capsys):
    from types import SimpleNamespace

    env = SimpleNamespace(**inputs, tmp=str(tmp_path), out=str(tmp_path / "out"))
    argv = case.argv(env)
    watched = [v for k, v in inputs.items() if k != "missing_teacher"] + [str(CONFIGS), str(tmp_path)]
    before = _snapshot(watched)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"exit code {code}; stderr: {err}"
    errors = [line for line in err if line.startswith("error: ")]  # diffusers' loading bars may come before it
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert errors[0].startswith("error: " + case.expect.format(**vars(env))), errors[0]
    assert "Traceback" not in "\n".join(err)
    assert _snapshot(watched) == before  # no input touched, no output folder made
    assert not Path(env.out).exists()


def render() -> str:
    lines = ["# Errors for bad inputs", "",
             "Each line: the bad input, then the one-line message `stepdistill` prints on stderr (exit code 2, no "
             "traceback, no file of yours touched). `{...}` stands for the path in question. Generated from "
             "tests/test_error_catalogue.py (`python tests/test_error_catalogue.py`), whose test checks every line.", ""]
    lines += [f"- **{c.what}** (`{c.id}`): `error: {c.expect}...`" for c in CASES]
    return "\n".join(lines) + "\n"


def test_docs_errors_md_is_the_catalogue():
    assert len(CASES) >= 30
    assert DOC.read_text() == render(), "docs/errors.md is stale: run `python tests/test_error_catalogue.py`"


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC} ({len(CASES)} cases)", file=sys.stderr)
