"""Rectified flow: the VP -> flow conversion, reflow pairs (stage, command, reader), reflow / InstaFlow / SlimFlow."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distiller_suite import DistillerSuite
from helpers import assert_pipeline_matches_own_sampler, tiny_config
from stepdistill.cli import main
from stepdistill.distillers.rectified_flow import anneal_beta, annealed_noise, draw_times, interpolate
from stepdistill.errors import ConfigError, StepdistillError
from stepdistill.flow_conversion import VPAsFlow
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.reflow_pairs import PairsOptions, ReflowPairs
from stepdistill.samplers import sample_ode
from stepdistill.schedules import FlowSchedule
from stepdistill.stages import build_stages, run_stages
from stepdistill.teacher import load_pipeline, load_teacher
from stepdistill.training.pairs import PairDataset
from tiny_models import tiny_class_unet, vp_scheduler

FAST_PAIRS = {"num": 10, "steps": 2, "shard_size": 4, "batch_size": 3, "seed": 5}


def pairs_stage(teacher, folder, **kw):
    return ReflowPairs("pairs", folder, str(teacher), PairsOptions(**{**FAST_PAIRS, **kw}))


@pytest.fixture(scope="module")
def pairs_dir(class_teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs") / "pairs"
    pairs_stage(class_teacher, folder, num=12).run()
    return folder


# ----------------------------------------------------------------------------- VP teacher in flow time


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_converted_vp_teacher_predicts_the_vp_x0_at_the_same_snr(prediction, tmp_path):
    pipe = ClassConditionalPipeline(unet=tiny_class_unet(), scheduler=vp_scheduler(prediction), null_class=10,
                                    num_classes=10)
    pipe.save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(str(tmp_path / "teacher"))
    wrapper = VPAsFlow.wrap(teacher.model, teacher.pipeline.scheduler.config, prediction)
    flow = teacher.denoiser.with_model(wrapper, "flow", FlowSchedule(1000))
    torch.manual_seed(0)
    x, labels = torch.randn(7, 1, 8, 8), {"class_labels": torch.arange(7)}
    t = torch.tensor([1e-3, 0.1, 0.3, 0.5, 0.7, 0.99, 1.0])
    t64 = t.double()
    c = torch.sqrt((1 - t64) ** 2 + t64 ** 2)
    tau = wrapper.vp_time(((1 - t64) / c) ** 2).float()
    a, s = teacher.denoiser.alpha_sigma(tau, x)
    snr_flow, snr_vp = ((1 - t64) / t64) ** 2, (a.double() / s.double()).flatten() ** 2
    # the VP time has the flow time's SNR wherever the VP schedule reaches it (not at t = 1: SNR 0)
    torch.testing.assert_close(snr_vp[:-1].log(), snr_flow[:-1].log(), atol=1e-3, rtol=1e-3)
    vp_x0 = teacher.denoiser.x0(x / c.float().reshape(-1, 1, 1, 1), tau, labels)
    torch.testing.assert_close(flow.x0(x, t, labels), vp_x0, atol=1e-4, rtol=1e-4)
    # a saved wrapper loads back (diffusers finds the class through stepdistill) and predicts the same
    wrapper.save_pretrained(tmp_path / "wrapper")
    again = VPAsFlow.from_pretrained(tmp_path / "wrapper")
    torch.testing.assert_close(again(x, t * 1000, class_labels=labels["class_labels"]).sample,
                               wrapper(x, t * 1000, class_labels=labels["class_labels"]).sample)


# ----------------------------------------------------------------------------- pairs


def test_pairs_are_the_teachers_ode_solutions_and_resume_after_a_crash(class_teacher, tmp_path):
    full = pairs_stage(class_teacher, tmp_path / "full")
    full.run()
    teacher = load_teacher(str(class_teacher))
    shard = load_file(str(tmp_path / "full" / "shard-00001.safetensors"))
    assert shard["noise"].shape == (4, 1, 8, 8) and shard["class_labels"].dtype == torch.int64
    assert shard["class_labels"].tolist() == [4, 5, 6, 7]  # classes in turn, j % 10
    grid = teacher.denoiser.schedule.sampling_grid(2, "trailing")
    expected = sample_ode(teacher.denoiser, shard["noise"], grid,
                          {"cond": teacher.conditioner.encode({"class_labels": shard["class_labels"]}, "cpu")})
    torch.testing.assert_close(shard["sample"], expected, atol=1e-5, rtol=1e-5)

    # a crash while writing shard 2: shards 0 and 1 kept, shard 2 torn (its temporary file), later ones never made
    crashed = pairs_stage(class_teacher, tmp_path / "part")
    made = []
    original = crashed.make_shard

    def make_or_crash(index, start, count, generator):
        if index == 2:
            (tmp_path / "part" / "shard-00002.safetensors.tmp").write_bytes(b"torn")
            raise KeyboardInterrupt
        made.append(index)
        return original(index, start, count, generator)

    crashed.make_shard = make_or_crash
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    assert made == [0, 1] and not crashed.finished()
    with pytest.raises(StepdistillError, match="unfinished"):
        PairDataset(tmp_path / "part")
    again = pairs_stage(class_teacher, tmp_path / "part")
    redone = []
    original_again = again.make_shard
    again.make_shard = lambda i, *a: redone.append(i) or original_again(i, *a)
    again.run()
    assert redone == [2] and again.finished()
    for k in range(3):
        a = load_file(str(tmp_path / "full" / f"shard-{k:05d}.safetensors"))
        b = load_file(str(tmp_path / "part" / f"shard-{k:05d}.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(StepdistillError, match="other settings"):
        pairs_stage(class_teacher, tmp_path / "part", steps=3).finished()


def test_pair_reader_reads_every_pair_and_names_what_is_wrong(class_teacher, pairs_dir, tmp_path):
    data = PairDataset(pairs_dir)
    assert len(data) == 12 and data.sample_shape == (1, 8, 8)
    item = data[9]
    shard = load_file(str(pairs_dir / "shard-00002.safetensors"))
    assert torch.equal(item["noise"], shard["noise"][1]) and int(item["class_labels"]) == 9
    data.check_teacher(load_teacher(str(class_teacher)))

    with pytest.raises(StepdistillError, match="does not exist"):
        PairDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepdistillError, match="no manifest.json"):
        PairDataset(tmp_path / "empty")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pairs_dir, broken)
    (broken / "shard-00001.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(StepdistillError, match="shard-00001.safetensors is corrupt"):
        PairDataset(broken)
    (broken / "shard-00001.safetensors").unlink()
    with pytest.raises(StepdistillError, match="shard-00001.safetensors is missing"):
        PairDataset(broken)


def test_reflow_pairs_command_writes_and_then_reuses_a_folder(class_teacher, tmp_path, capsys):
    args = ["reflow-pairs", str(class_teacher), "--num", "5", "--out", str(tmp_path / "p"), "--steps", "2",
            "--shard-size", "3", "--guidance-scale", "2.0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pairs/s" in out and len(PairDataset(tmp_path / "p")) == 5
    assert main(args) == 0 and "already holds" in capsys.readouterr().out
    assert main(["reflow-pairs", str(class_teacher), "--num", "0", "--out", str(tmp_path / "q")]) == 2


# ----------------------------------------------------------------------------- the math


def test_time_distributions_paths_and_annealing():
    torch.manual_seed(0)
    for kind in ("uniform", "logit_normal", "u_shaped"):
        t = draw_times(kind, 20000, "cpu")
        assert 0 < t.min() and t.max() < 1
    u = draw_times("u_shaped", 20000, "cpu")
    assert ((u < 0.1) | (u > 0.9)).float().mean() > 2 * ((u > 0.4) & (u < 0.6)).float().mean()  # mass at the ends
    z, x = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    assert torch.equal(interpolate(z, x, torch.ones(3)), z) and torch.equal(interpolate(z, x, torch.zeros(3)), x)
    assert anneal_beta(0, 10) == 1.0 and anneal_beta(5, 10) == 0.5 and anneal_beta(20, 10) == 0.0
    fresh = torch.randn_like(z)
    assert torch.equal(annealed_noise(z, fresh, 1.0), fresh) and torch.equal(annealed_noise(z, fresh, 0.0), z)


def test_a_reflow_student_starts_as_the_converted_teacher(class_teacher, pairs_dir, tmp_path):
    from stepdistill.runner import build

    cfg = tiny_config("digits/reflow.yaml", class_teacher, tmp_path, "stages=[]", "data.dataset=pairs",
                      f"data.path={pairs_dir}")
    _, d, data = build(cfg)
    assert isinstance(d.student, VPAsFlow) and isinstance(d.student_denoiser.schedule, FlowSchedule)
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8]), {"class_labels": torch.tensor([1, 2])}
    torch.testing.assert_close(d.student_denoiser.x0(x, t, cond), d.flow_teacher.x0(x, t, cond))
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("noise", "sample", "class_labels")}
    assert math.isfinite(d.loss(batch, 0, "student")["loss"].item())
    with pytest.raises(ConfigError, match="trains on reflow pairs"):
        build_stages(tiny_config("digits/reflow.yaml", class_teacher, tmp_path, "stages=[{name: r}]"))


# ----------------------------------------------------------------------------- whole runs


class TestReflow(DistillerSuite):
    config_file = "digits/reflow.yaml"
    overrides = ("stages=[]", "data.dataset=pairs", "export.steps=[1,2,4]")

    @classmethod
    def extra_overrides(cls, request):
        return [f"data.path={request.getfixturevalue('pairs_dir')}"]

    def test_exported_flow_pipeline_samples_as_the_own_sampler(self, finished):
        cfg, trainer = finished
        pipe = load_pipeline(str(Path(cfg.output_dir) / "student"))
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert isinstance(pipe.unet, VPAsFlow)
        assert_pipeline_matches_own_sampler(trainer, pipe, [1, 2, 4])


class TestInstaFlow(DistillerSuite):
    """One-step distillation straight from the (VP) teacher, as `teacher: ${stages.reflow}` would from a reflow."""

    config_file = "digits/instaflow.yaml"
    overrides = ("stages=[]", "data.dataset=pairs")

    @classmethod
    def extra_overrides(cls, request):
        return [f"data.path={request.getfixturevalue('pairs_dir')}"]


class TestSlimFlow(DistillerSuite):
    """Annealing reflow of a student of half the tiny teacher's width, from scratch."""

    config_file = "digits/slimflow.yaml"
    overrides = ("stages=[]", "data.dataset=pairs", "distill.student.changes={block_out_channels: [4, 8]}",
                 "distill.anneal_steps=2")

    @classmethod
    def extra_overrides(cls, request):
        return [f"data.path={request.getfixturevalue('pairs_dir')}"]


def test_text_teacher_configs_build_their_stages(sd15_teacher, sd3_teacher, prompt_file, tmp_path):
    for config, teacher, names in (("sd15/instaflow.yaml", sd15_teacher, ["pairs", "reflow", "pairs_2rf", "instaflow"]),
                                   ("sd3/reflow.yaml", sd3_teacher, ["pairs", "reflow"])):
        cfg = tiny_config(config, teacher, tmp_path / config, f"data.path={prompt_file}")
        stages = build_stages(cfg)
        assert [s.name for s in stages] == names
        assert stages[0].prompts and stages[0].teacher_source == str(teacher)
        assert stages[1].config.data.path == str(tmp_path / config / "pairs")


def test_instaflow_config_chains_pairs_reflow_and_one_step_distillation(class_teacher, tmp_path):
    cfg = tiny_config("digits/instaflow.yaml", class_teacher, tmp_path, "train.max_steps=1")
    cfg.stages[0].options = dict(FAST_PAIRS, num=8)
    cfg.stages[1].options["train.max_steps"] = 1
    stages = build_stages(cfg)
    assert [s.name for s in stages] == ["pairs", "reflow", "instaflow"]
    assert stages[2].config.teacher == str(tmp_path / "reflow" / "student")
    run_stages(stages)
    assert all(s.finished() for s in stages)
    pipe = load_pipeline(str(tmp_path / "instaflow" / "student"))
    images = pipe(class_labels=[1, 2], num_inference_steps=1, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_slimflow_trains_a_smaller_student_then_distils_it(class_teacher, tmp_path):
    cfg = tiny_config("digits/slimflow.yaml", class_teacher, tmp_path, "train.max_steps=2",
                      "distill.anneal_steps=1", "distill.student.changes={block_out_channels: [4, 8]}")
    cfg.stages[0].options = dict(FAST_PAIRS, num=8)
    cfg.stages[2].options["train.max_steps"] = 1
    stages = run_stages(build_stages(cfg))
    small = load_pipeline(str(tmp_path / "anneal" / "student")).unet
    teacher = load_pipeline(str(class_teacher)).unet
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    assert type(small).__name__ == "UNet2DConditionModel"  # a plain flow UNet: no VP conversion
    assert stages[-1].finished()
    distilled = load_pipeline(str(tmp_path / "distill" / "student"))
    assert distilled.unet.config.block_out_channels == [4, 8]


def test_text_teacher_pairs_carry_their_prompts_and_train_a_converted_student(sd15_teacher, prompt_file, tmp_path):
    from stepdistill.runner import build

    stage = pairs_stage(sd15_teacher, tmp_path / "pairs", num=3, steps=1, shard_size=2, prompts=str(prompt_file))
    stage.run()
    data = PairDataset(tmp_path / "pairs")
    prompts = [line.strip() for line in Path(prompt_file).read_text().splitlines() if line.strip()]
    assert [data[i]["prompt"] for i in range(3)] == [prompts[i % len(prompts)] for i in range(3)]
    with pytest.raises(StepdistillError, match="prompt file"):
        pairs_stage(sd15_teacher, tmp_path / "none", num=1, steps=1).run()
    cfg = tiny_config("digits/reflow.yaml", sd15_teacher, tmp_path / "run", "stages=[]", "data.dataset=pairs",
                      f"data.path={tmp_path / 'pairs'}")
    _, d, data = build(cfg)
    batch = {"noise": torch.stack([data[i]["noise"] for i in range(2)]),
             "sample": torch.stack([data[i]["sample"] for i in range(2)]), "prompt": [data[i]["prompt"] for i in range(2)]}
    assert isinstance(d.student, VPAsFlow) and math.isfinite(d.loss(batch, 0, "student")["loss"].item())


def test_a_converted_sd15_student_exports_a_pipeline_that_loads_and_samples(sd15_teacher, prompt_file, tmp_path):
    from stepdistill.export import export_student
    from stepdistill.runner import build

    pairs_stage(sd15_teacher, tmp_path / "pairs", num=2, steps=1, prompts=str(prompt_file)).run()
    cfg = tiny_config("digits/instaflow.yaml", sd15_teacher, tmp_path / "run", "stages=[]", "data.dataset=pairs",
                      f"data.path={tmp_path / 'pairs'}")
    _, d, _ = build(cfg)
    export_student(d, tmp_path / "student", 1)
    pipe = load_pipeline(str(tmp_path / "student"))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and isinstance(pipe.unet, VPAsFlow)
    images = pipe(prompt=["a red cat"], num_inference_steps=2, output_type="np", guidance_scale=1.0).images
    assert images.shape[0] == 1 and (images >= 0).all() and (images <= 1).all()
