"""`stepdistill fid` end to end on tiny saved pipelines and folders: generation, caching, errors, statistics
files, plots, CLIP score, and FID logged during training."""

import json

import numpy as np
import pytest
import torch
from eval_helpers import digits_folder, save_tiny_clip, save_tiny_text_pipeline
from PIL import Image

from stepdistill.cli import main
from stepdistill.errors import ConfigError
from stepdistill.eval import fid as fid_module
from stepdistill.eval.features import DIGITS_EXTRACTOR
from stepdistill.eval.fid import concat_parts, create_extractor, extract, extract_parts
from stepdistill.eval.report import read_runs
from stepdistill.eval.sources import pipeline_source
from stepdistill.paths import DIGITS_CLASSIFIER


@pytest.fixture(autouse=True)
def stats_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "eval-cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return digits_folder(tmp_path_factory.mktemp("ref") / "digits", range(0, 64))


def fid_json(tmp_path, *argv, name="out.json") -> dict:
    path = tmp_path / name
    assert main(["fid", *map(str, argv), "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_pipeline_against_folder_end_to_end(class_teacher, reference, tmp_path):
    samples, table = tmp_path / "samples", tmp_path / "table.md"
    gen = fid_json(tmp_path, class_teacher, reference, "--extractor", "digits", "--steps", "2", "--num-samples", "24",
                   "--batch-size", "10", "--metrics", "fid,kid", "--save-samples", samples, "--markdown", table)
    assert gen["fid"] > 0 and np.isfinite(gen["kid_mean"])
    assert (gen["model"], gen["sampler"], gen["steps"], gen["num_samples"]) == ("class", "DDIMScheduler", 2, 24)
    assert sorted(p.name for p in samples.iterdir())[:2] == ["000000.png", "000001.png"]
    assert len(list(samples.iterdir())) == 24 and Image.open(samples / "000000.png").size == (8, 8)

    # the saved PNGs are exactly what was measured
    saved = fid_json(tmp_path, samples, reference, "--extractor", "digits", "--metrics", "fid,kid", "--markdown", table,
                     name="saved.json")
    assert saved["fid"] == pytest.approx(gen["fid"], rel=1e-9) and saved["kid_mean"] == pytest.approx(gen["kid_mean"])
    rows = table.read_text().splitlines()
    assert rows[0].startswith("| A | B | steps | samples | extractor | FID |") and len(rows) == 4

    # seeded per sample: another batch size (and so another split across processes) draws the same samples
    again = fid_json(tmp_path, class_teacher, reference, "--extractor", "digits", "--steps", "2", "--num-samples", "24",
                     "--batch-size", "7", "--no-cache", name="again.json")
    assert again["fid"] == pytest.approx(gen["fid"], rel=1e-3)


def test_work_split_across_processes_gathers_to_the_single_process_result(class_teacher):
    """Batch j goes to rank j % world; merging the ranks' parts gives the one-process features, in order."""
    extractor = create_extractor(DIGITS_EXTRACTOR, DIGITS_CLASSIFIER, "cpu")
    source, _ = pipeline_source(class_teacher, num=13, steps=1, seed=3)
    whole = extract(source, extractor, 4, progress=False)["features"]
    parts = [extract_parts(source, extractor, 4, None, rank, 2, progress=False) for rank in (0, 1)]
    assert sorted(parts[0]) == [0, 2] and sorted(parts[1]) == [1, 3]
    assert torch.equal(concat_parts({**parts[0], **parts[1]})["features"], whole)
    assert whole.shape == (13, 64)


def test_reference_statistics_are_cached_and_reused(reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("STEPDISTILL_CACHE", str(cache))
    other = digits_folder(tmp_path / "other", range(100, 140), noise=0.2)
    first = fid_json(tmp_path, other, reference, "--extractor", "digits", "--metrics", "fid,kid")
    files = sorted((cache / "fid-stats").iterdir())
    assert len(files) == 2 and all(f.suffix == ".safetensors" for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]

    calls = []
    real_extract = fid_module.extract
    monkeypatch.setattr(fid_module, "extract", lambda *a, **k: calls.append(a[0].label) or real_extract(*a, **k))
    second = fid_json(tmp_path, other, reference, "--extractor", "digits", "--metrics", "fid,kid", name="2.json")
    assert calls == [] and second["fid"] == first["fid"] and second["kid_mean"] == first["kid_mean"]
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(other / "000000.png")  # new content, new key
    fid_json(tmp_path, other, reference, "--extractor", "digits", name="3.json")
    assert calls == ["other"] and len(list((cache / "fid-stats").iterdir())) == 3

    from stepdistill.eval.quality import DigitsFID

    DigitsFID()
    DigitsFID()  # the quickstart's reference: computed once, then read
    assert calls == ["other", "digits16"]


def test_saved_statistics_stand_in_for_the_folder(reference, tmp_path):
    other = digits_folder(tmp_path / "other", range(200, 240), noise=0.2)
    stats = tmp_path / "ref.safetensors"
    assert main(["fid", str(reference), "--extractor", "digits", "--save-stats", str(stats)]) == 0
    direct = fid_json(tmp_path, other, reference, "--extractor", "digits", "--metrics", "fid,kid")
    via_stats = fid_json(tmp_path, other, stats, "--metrics", "fid,kid", name="s.json")
    assert via_stats["extractor"] == DIGITS_EXTRACTOR  # chosen from the file
    assert via_stats["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    assert via_stats["kid_mean"] == pytest.approx(direct["kid_mean"], rel=1e-9)


def test_bad_inputs_are_named(class_teacher, uncond_teacher, reference, tmp_path, capsys, monkeypatch):
    def error(*argv):
        assert main(["fid", *map(str, argv)]) == 2
        return capsys.readouterr().err

    assert f"image folder {tmp_path / 'nope'} does not exist" in error(tmp_path / "nope", reference, "--extractor",
                                                                         "digits")
    assert "nope/x does not exist here, and as a hub pipeline id it did not load" in error("nope/x", reference)
    (tmp_path / "empty").mkdir()
    assert f"no images (.png, .jpg, .jpeg, .webp, .bmp) directly inside {tmp_path / 'empty'}" in error(
        tmp_path / "empty", reference, "--extractor", "digits")
    broken = digits_folder(tmp_path / "broken", range(5))
    (broken / "000003.png").write_bytes(b"\x89PNG not really")
    msg = error(broken, reference, "--extractor", "digits", "--no-cache")
    assert f"cannot read image {broken / '000003.png'}" in msg
    (tmp_path / "notes.txt").write_text("hi")
    assert "is a file but not a statistics file" in error(tmp_path / "notes.txt", reference)
    assert "give B too" in error(reference, "--extractor", "digits")
    assert "--metrics: unknown metric 'fd'" in error(reference, reference, "--metrics", "fd")
    assert "has classes 0 .. 9" in error(class_teacher, reference, "--classes", "12", "--extractor", "digits")
    assert "is not class-conditional" in error(uncond_teacher, reference, "--classes", "1", "--extractor", "digits")

    from stepdistill.eval.fid import Statistics

    Statistics.from_features(torch.randn(5, 64), "stepdistill-digits:features:aa", "a").save(tmp_path / "a.safetensors")
    Statistics.from_features(torch.randn(5, 2048), "inception-fid-torchscript:2048:b", "b").save(tmp_path / "b.safetensors")
    monkeypatch.setenv("STEPDISTILL_ASSETS", str(tmp_path))  # not opened: the mismatch is found first
    msg = error(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--extractor", "digits")
    assert "mismatched statistics" in msg and "a was embedded with stepdistill-digits" in msg


def test_plot_of_fid_against_steps(tmp_path):
    quickstart = [{"model": "teacher", "sampler": "ddim", "steps": s, "fid": f, "params": 1}
                  for s, f in ((1, 90.0), (2, 40.0), (4, 12.0), (50, 2.0))]
    quickstart += [{"model": "cd", "sampler": "multistep-consistency", "steps": s, "fid": f, "params": 1}
                   for s, f in ((1, 20.0), (2, 10.0), (4, 8.0))]
    (tmp_path / "results.json").write_text(json.dumps(quickstart))
    for s, f in ((1, 30.0), (4, 9.0)):
        (tmp_path / f"run{s}.json").write_text(json.dumps({"fid": f, "steps": s, "model": "student", "sampler": "LCM"}))
    runs = read_runs([tmp_path / "results.json", tmp_path / "run1.json", tmp_path / "run4.json"])
    assert runs == {"teacher (ddim)": {1: 90.0, 2: 40.0, 4: 12.0, 50: 2.0},
                    "cd (multistep-consistency)": {1: 20.0, 2: 10.0, 4: 8.0}, "student (LCM)": {1: 30.0, 4: 9.0}}
    out = tmp_path / "plot.png"
    assert main(["fid", "--plot", str(tmp_path / "results.json"), str(tmp_path / "run1.json"),
                 str(tmp_path / "run4.json"), "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 300
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 5  # lines in several colours
    (tmp_path / "bad.json").write_text(json.dumps({"fid": 3.0}))
    assert main(["fid", "--plot", str(tmp_path / "bad.json"), "--out", str(out)]) == 2


def test_clip_score_of_a_text_pipeline(tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    pipe, clip = save_tiny_text_pipeline(tmp_path / "sd"), save_tiny_clip(tmp_path / "clip")
    (tmp_path / "prompts.txt").write_text("a red dog\nblue sky\n")
    out = fid_json(tmp_path, pipe, "--prompts", tmp_path / "prompts.txt", "--clip-model", clip, "--metrics", "clip",
                   "--num-samples", "4", "--steps", "2", "--save-samples", tmp_path / "samples")
    images = [np.asarray(Image.open(tmp_path / "samples" / f"{i:06d}.png")) for i in range(4)]
    assert images[0].shape == (16, 16, 3)

    model = CLIPModel.from_pretrained(clip).eval()
    size = model.config.vision_config.image_size
    pixels = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})(
        images=images, return_tensors="pt")["pixel_values"]
    text = AutoTokenizer.from_pretrained(clip)(["a red dog", "blue sky"] * 2, padding=True, return_tensors="pt")
    with torch.no_grad():
        o = model(pixel_values=pixels, **text)
        cos = (o.logits_per_image / model.logit_scale.exp()).diagonal()
    assert out["clip_score"] == pytest.approx(float((100 * cos).clamp(min=0).mean()), rel=1e-4)
    assert 0 <= out["clip_score"] <= 100

    assert main(["fid", str(pipe), "--num-samples", "2", "--metrics", "clip", "--clip-model", str(clip)]) == 2


def test_training_logs_fid_every_n_steps_without_touching_the_training_rng(class_teacher, tmp_path, monkeypatch):
    from helpers import student_state, tiny_config

    from stepdistill.eval import evaluator as evaluator_module
    from stepdistill.runner import run

    logged = []
    make = evaluator_module.make_evaluator

    def recording(cfg):
        ev = make(cfg)
        return lambda d, m, step: logged.append((step, ev(d, m, step))) or logged[-1][1]

    monkeypatch.setattr(evaluator_module, "make_evaluator", recording)
    with_eval = run(tiny_config("digits/consistency.yaml", class_teacher, tmp_path / "a", "train.max_steps=2",
                                "eval.every=1", "eval.num_samples=8", "eval.steps=[1,2]"))
    assert [s for s, _ in logged] == [1, 2]
    assert all(set(m) == {"fid/1step", "fid/2step"} and all(np.isfinite(v) for v in m.values()) for _, m in logged)
    without = run(tiny_config("digits/consistency.yaml", class_teacher, tmp_path / "b", "train.max_steps=2"))
    assert len(logged) == 2  # eval.every = 0: no evaluator
    a, b = student_state(with_eval), student_state(without)
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ConfigError, match="eval.every = 5 needs reference images"):
        make(tiny_config("digits/consistency.yaml", class_teacher, tmp_path / "c", "eval.every=5", "data.dataset=none"))


@pytest.mark.slow
def test_two_processes_give_the_one_process_samples_and_metrics(class_teacher, reference, tmp_path):
    """torchrun, two CPU processes (gloo): each generates every other batch; features are gathered in order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    argv = ["fid", str(class_teacher), str(reference), "--extractor", "digits", "--steps", "2", "--num-samples", "30",
            "--batch-size", "4", "--metrics", "fid,kid", "--no-cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "stepdistill.cli", *argv, "--save-samples", str(tmp_path / "two"),
                           "--json", str(tmp_path / "two.json")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = fid_json(tmp_path, *argv[1:], "--save-samples", tmp_path / "one", name="one.json")
    two = json.loads((tmp_path / "two.json").read_text())
    assert (two["fid"], two["kid_mean"]) == (one["fid"], one["kid_mean"])
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 30
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)
