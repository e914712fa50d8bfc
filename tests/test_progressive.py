"""Progressive distillation and guidance distillation: the target equation, the weighting, the grid
alignment, the exported schedulers, round chaining and per-round resume, and the shared suite."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)
from torch import nn

from distiller_suite import DistillerSuite
from helpers import tiny_config
from stepdistill import runner, solvers
from stepdistill.config import load_config
from stepdistill.denoiser import PARAMETERIZATIONS
from stepdistill.distillers.progressive import (GuidanceDistiller, ProgressiveDistiller, ddim_target, loss_weight,
                                                step_grids, student_grid, weighted_mse)
from stepdistill.errors import ConfigError
from stepdistill.paths import CONFIGS
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.runner import build, run, run_stages
from stepdistill.stages import build_stages
from stepdistill.schedules import FlowSchedule, VPSchedule
from stepdistill.training.trainer import Trainer

ROUND1 = ("distill.round=1", "distill.start_steps=16")  # one round, 16 -> 8 steps (8 divides T: DDIM export)


class Fixed(nn.Module):
    """A 'network' whose raw output is a given tensor (to put an exact prediction through a Denoiser)."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, sample, timestep, return_dict=False):
        return (self.out,)


class Smooth(nn.Module):
    """A fixed nonlinear stand-in teacher: out = tanh(x) * (1 + t / 1000)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, sample, timestep, return_dict=False):
        return (torch.tanh(sample) * (1 + timestep.reshape(-1, 1, 1, 1) / 1000),)


SCHEDULES = {
    "vp_cosine": VPSchedule.from_scheduler_config(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config),
    "vp_scaled_linear": VPSchedule.from_scheduler_config(DDPMScheduler(beta_schedule="scaled_linear").config),
    "flow": FlowSchedule(1000, shift=3.0),
}


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("schedule, teacher_kind", [("vp_cosine", "epsilon"), ("vp_cosine", "v_prediction"),
                                                     ("vp_scaled_linear", "epsilon"), ("flow", "flow")])
def test_one_student_ddim_step_lands_exactly_on_the_teachers_two_steps(schedule, teacher_kind):
    """x_tilde (Algorithm 2) put through a v-student's head (flow: velocity head) and one DDIM step gives the teacher's z_t''."""
    sched = SCHEDULES[schedule]
    teacher = PARAMETERIZATIONS[teacher_kind](Smooth(), sched)
    steps = 8
    grid, mid = step_grids(sched, steps)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):  # every step, including the top (SNR ~ 0) and the last one into t = 0
        t, t_mid, t_next = grid[i], mid[i], grid[i + 1]
        z = torch.randn(3, 1, 4, 4, generator=g)
        z_next = solvers.ddim_step(teacher, solvers.ddim_step(teacher, z, t, t_mid), t_mid, t_next)
        a, s = teacher.alpha_sigma(t.expand(3), z)
        a2, s2 = teacher.alpha_sigma(t_next.expand(3), z)
        x_tilde = ddim_target(z, z_next, a, s, a2, s2)
        eps_tilde = (z - a * x_tilde) / s
        head = PARAMETERIZATIONS["flow" if schedule == "flow" else "v_prediction"]  # the student's head
        raw = head(None, sched).to_output(x_tilde, eps_tilde, a, s)  # what a student would have to output
        student = head(Fixed(raw), sched)
        landed = solvers.ddim_step(student, z, t, t_next)
        torch.testing.assert_close(landed, z_next, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(student.x0(z, t), x_tilde, atol=2e-4, rtol=1e-4)


def test_last_step_target_is_the_teachers_denoised_sample():
    """Into t'' = 0 (s'' = 0) the target is the teacher's two-step result itself."""
    sched = SCHEDULES["vp_cosine"]
    z, z_next = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    a, s = sched.alpha_sigma(torch.tensor([0.25, 0.25]))
    a, s = a.reshape(2, 1, 1, 1), s.reshape(2, 1, 1, 1)
    x = ddim_target(z, z_next, a, s, torch.ones_like(a), torch.zeros_like(s))
    torch.testing.assert_close(x, z_next)


def test_weighting_is_truncated_snr_or_snr_plus_one():
    a = torch.tensor([0.8, 0.6, 2 ** -0.5, 0.0])
    s = (1 - a ** 2).sqrt()
    snr = (a / s) ** 2
    torch.testing.assert_close(loss_weight(a, s, "truncated_snr"), torch.maximum(snr, torch.ones(4)))
    torch.testing.assert_close(loss_weight(a, s, "snr_plus_one"), snr + 1)
    # as the paper states them: max(SNR,1) |x err|^2 = max(|x err|^2, |eps err|^2), (SNR+1) |x err|^2 = |v err|^2
    x, x_hat, z = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    a2, s2 = a[:3, None], s[:3, None]  # SNR > 0 rows, where eps is defined
    eps, eps_hat = (z[:3] - a2 * x[:3]) / s2, (z[:3] - a2 * x_hat[:3]) / s2
    x_err = ((x_hat[:3] - x[:3]) ** 2).mean(1)
    eps_err = ((eps_hat - eps) ** 2).mean(1)
    torch.testing.assert_close(loss_weight(a[:3], s[:3], "truncated_snr") * x_err, torch.maximum(x_err, eps_err))
    v, v_hat = a2 * eps - s2 * x[:3], a2 * eps_hat - s2 * x_hat[:3]
    torch.testing.assert_close(loss_weight(a[:3], s[:3], "snr_plus_one") * x_err, ((v_hat - v) ** 2).mean(1))
    torch.testing.assert_close(weighted_mse(x_hat[:3], x[:3], loss_weight(a[:3], s[:3], "snr_plus_one")),
                               ((v_hat - v) ** 2).mean(1).mean())


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32, 64])
def test_grids_nest_across_rounds_and_match_the_exported_schedulers(steps):
    sched = SCHEDULES["vp_cosine"]
    grid, mid = step_grids(sched, steps)
    fine = student_grid(sched, 2 * steps)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == steps + 1
    # the teacher (the previous round's student) is only evaluated on its own grid
    torch.testing.assert_close(fine[::2], grid)
    torch.testing.assert_close(fine[1::2], mid)
    assert bool(((grid[:-1] > mid) & (mid > grid[1:])).all())
    # the exported scheduler's timesteps are the grid's, and for DDIM its jump lands on the next point
    cfg = DDIMScheduler(beta_schedule="squaredcos_cap_v2").config
    euler = EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing")
    euler.set_timesteps(steps)
    torch.testing.assert_close(sched.model_timestep(grid[:-1]), euler.timesteps.float())
    if 1000 % steps == 0:
        ddim = DDIMScheduler.from_config(cfg, timestep_spacing="trailing")
        ddim.set_timesteps(steps)
        torch.testing.assert_close(sched.model_timestep(grid[:-1]), ddim.timesteps.float())
        prev = ddim.timesteps - 1000 // steps
        torch.testing.assert_close(sched.t_of_timestep(prev[:-1]).float(), grid[1:-1])


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_flow_grids_nest_across_rounds_on_shifted_k_over_k(steps):
    """Flow rounds use shift(k / N): round r's grid is every other point of round r-1's, so the teacher (the previous
    round's student) is queried only at its own grid points (FlowMatchEuler.set_timesteps(N) grids do not nest)."""
    sched = SCHEDULES["flow"]
    grid, mid = step_grids(sched, steps)
    fine = student_grid(sched, 2 * steps)
    torch.testing.assert_close(grid, sched.shifted(torch.linspace(1, 0, steps + 1, dtype=torch.float64)).float())
    torch.testing.assert_close(fine[::2], grid)
    torch.testing.assert_close(fine[1::2], mid)
    assert bool(((grid[:-1] > mid) & (mid > grid[1:])).all())
    assert set(grid.tolist()) <= set(fine.tolist())
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(steps)
    old, old_fine = fm.sigmas.clone(), (fm.set_timesteps(2 * steps), fm.sigmas)[1]
    if steps >= 4:  # the diffusers grids the rounds used before: not nested (4 -> 8: 0.858, 0.602 are not on it)
        assert not set(old[1:-1].tolist()) <= set(old_fine.tolist())


def test_flow_rounds_train_and_export_on_the_nested_grid(flow_class_teacher, tmp_path):
    """Every round of a flow teacher: its teacher's queries lie on the previous round's grid, and the export
    (FlowGridScheduler at num_inference_steps=N) samples as the student's own Euler on its grid."""
    from stepdistill.pipelines import FlowGridScheduler

    cfg = tiny_config("digits/progressive.yaml", flow_class_teacher, tmp_path, "distill.start_steps=4",
                      "train.max_steps=1", "train.checkpoint_every=0")
    grids = []
    for stage in build_stages(cfg):
        trainer = run(stage.config)
        d = trainer.distiller
        grids.append(d.grid)
        pipe = ClassConditionalPipeline.from_pretrained(Path(stage.output_dir) / "student")
        assert isinstance(pipe.scheduler, FlowGridScheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler.set_timesteps(d.steps)
        torch.testing.assert_close(pipe.scheduler.sigmas, d.grid, atol=1e-6, rtol=0)
        labels = torch.tensor([0, 3, 7])
        noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        ours = d.sample(noise, {"class_labels": labels}, d.steps, networks=trainer.export_networks())
        theirs = pipe(class_labels=labels, num_inference_steps=d.steps, latents=noise, output_type="pt").images
        torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5, rtol=0)
        assert "sigmas=" in (Path(stage.output_dir) / "student" / "README.md").read_text()
    for coarse, fine in zip(grids[1:], grids):  # round r's grid is a subset of round r-1's
        assert set(coarse.tolist()) <= set(fine.tolist())
    assert [len(g) - 1 for g in grids] == [2, 1]


# ----------------------------------------------------------------------------- config


def test_config_checks_name_the_key(class_teacher, tmp_path):
    with pytest.raises(ConfigError, match="distill.start_steps / distill.end_steps"):
        tiny_config("digits/progressive.yaml", class_teacher, tmp_path, "distill.start_steps=48", "distill.end_steps=1")
    with pytest.raises(ConfigError, match="distill.round"):
        tiny_config("digits/progressive.yaml", class_teacher, tmp_path, "distill.round=7")
    with pytest.raises(ConfigError, match="guidance_scale_max"):
        tiny_config("digits/guidance.yaml", class_teacher, tmp_path, "distill.guidance_scale_max=0.5")
    # a scale range needs a student with a scale input; the plain teacher has none
    with pytest.raises(ConfigError, match="method 'guidance' first"):
        build(tiny_config("digits/progressive.yaml", class_teacher, tmp_path, *ROUND1, "distill.guidance_scale_max=3"))
    with pytest.raises(ConfigError, match="all rounds"):
        build(tiny_config("digits/progressive.yaml", class_teacher, tmp_path))
    cfg = load_config(CONFIGS / "sd15/guidance_progressive.yaml")
    assert cfg.method == "guidance" and cfg.distill.progressive_start_steps == 512


def test_guidance_needs_a_null_condition(uncond_teacher, tmp_path):
    with pytest.raises(ConfigError, match="null condition"):
        build(tiny_config("digits/guidance.yaml", uncond_teacher, tmp_path))


# ----------------------------------------------------------------------------- distillers


@pytest.mark.parametrize("method", ["progressive", "guidance"])
def test_student_of_an_eps_teacher_predicts_as_the_teacher_at_init(method, tmp_path):
    """An eps teacher's weights are the student's start, so the student keeps eps (SNR > 0 on every grid time): its
    x0 equals the teacher's on a batch at several t, the top of the grid included; a v head is refused."""
    from tiny_models import tiny_class_unet, vp_scheduler

    path = tmp_path / "eps-teacher"
    ClassConditionalPipeline(unet=tiny_class_unet(), scheduler=vp_scheduler("epsilon", "scaled_linear"),
                             null_class=10).save_pretrained(path)
    extra = ROUND1 if method == "progressive" else ()
    _, d, _ = build(tiny_config(f"digits/{method}.yaml", path, tmp_path / "run", *extra))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.tensor([0, 1, 2, 3])}
    student_cond = d.guided.condition(cond, torch.full((4,), 1.0), 4, "cpu") if method == "guidance" else cond
    for t in (1.0, 0.9, 0.5, 0.1, 0.01):
        with torch.no_grad():
            theirs = d.teacher.x0(x, torch.full((4,), t), cond)
            ours = d.student_denoiser.x0(x, torch.full((4,), t), student_cond)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert theirs.abs().max() > 1  # at t = 1, x0 = 14.7 (x - eps_hat): not the 0.07 x - eps_hat of a v reading
    assert d.export_scheduler(8).config.prediction_type == "epsilon"
    with pytest.raises(ConfigError, match="differs from the teacher's 'epsilon'"):
        build(tiny_config(f"digits/{method}.yaml", path, tmp_path / "run2", *extra,
                          "distill.prediction_type=v_prediction"))


def test_start_steps_beyond_the_teachers_timesteps_are_refused(class_teacher, tmp_path):
    """The old default 1024 > T = 1000 gave a trailing grid with 24 zero-length steps; the default is now 512."""
    from stepdistill.distillers.progressive import ProgressiveConfig

    assert ProgressiveConfig().start_steps == 512
    with pytest.raises(ConfigError, match="1024-step teacher grid exceeds the teacher's 1000"):
        build(tiny_config("digits/progressive.yaml", class_teacher, tmp_path, "distill.round=1",
                          "distill.start_steps=1024"))
    build(tiny_config("digits/progressive.yaml", class_teacher, tmp_path, "distill.round=2", "distill.start_steps=1024"))
    with pytest.raises(ConfigError, match="progressive_start_steps: a 2048-step"):
        build(tiny_config("digits/guidance.yaml", class_teacher, tmp_path, "distill.progressive_start_steps=2048"))


def test_loss_is_the_weighted_error_against_the_two_step_target(class_teacher, tmp_path):
    """The loss equals max(SNR, 1) |x_hat - x_tilde|^2 with x_tilde computed here from two plain teacher DDIM steps."""
    _, d, _ = build(tiny_config("digits/progressive.yaml", class_teacher, tmp_path, *ROUND1))
    batch = {"pixel_values": torch.rand(4, 1, 8, 8) * 2 - 1, "class_labels": torch.tensor([0, 1, 2, 3])}
    torch.manual_seed(1)
    loss = d.loss(batch, 0, "student")["loss"]
    torch.manual_seed(1)
    x0 = batch["pixel_values"]
    i = torch.randint(0, d.steps, (4,))
    t, t_mid, t_next = d.grid[i], d.mid[i], d.grid[i + 1]
    z = d.teacher.add_noise(x0, torch.randn_like(x0), t)
    cond = {"class_labels": batch["class_labels"]}
    with torch.no_grad():
        z_next = solvers.ddim_step(d.teacher, solvers.ddim_step(d.teacher, z, t, t_mid, cond), t_mid, t_next, cond)
        a, s = d.teacher.alpha_sigma(t, z)
        a2, s2 = d.teacher.alpha_sigma(t_next, z)
        target = ddim_target(z, z_next, a, s, a2, s2)
        x_hat = d.student_denoiser.x0(z, t, cond)
    expected = (loss_weight(a, s, "truncated_snr").reshape(-1) * ((x_hat - target) ** 2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert loss.requires_grad


def test_guidance_target_is_cfg_and_the_student_starts_as_the_conditional_teacher(class_teacher, tmp_path):
    _, d, _ = build(tiny_config("digits/guidance.yaml", class_teacher, tmp_path, "distill.progressive_start_steps=0"))
    assert isinstance(d, GuidanceDistiller) and d.student.config.time_cond_proj_dim == 256
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.3, 0.6, 0.9])
    cond = {"class_labels": torch.tensor([1, 4, 7])}
    w = torch.tensor([1.0, 2.0, 4.5])
    with torch.no_grad():
        xc = d.teacher.x0(x, t, cond)
        xu = d.teacher.x0(x, t, {"class_labels": torch.tensor([10, 10, 10])})
        torch.testing.assert_close(d.teacher.x0(x, t, cond, guidance=w), xu + w.reshape(-1, 1, 1, 1) * (xc - xu))
        # zero-initialised scale input: at init the student is the conditional teacher at every w
        for scale in (1.0, 4.0):
            s_cond = d.guided.condition(cond, torch.full((3,), scale), 3, "cpu")
            torch.testing.assert_close(d.student_denoiser.x0(x, t, s_cond), xc, atol=1e-5, rtol=1e-5)


def test_rounds_chain_teachers_and_resume_per_round(class_teacher, tmp_path, monkeypatch):
    cfg = tiny_config("digits/progressive.yaml", class_teacher, tmp_path, "distill.start_steps=8", "train.max_steps=2",
                      "train.checkpoint_every=1")
    stages = ProgressiveDistiller.stages(cfg)
    assert [s.distill.round for s in stages] == [1, 2, 3]
    assert [s.export.steps for s in stages] == [[4], [2], [1]]
    assert [Path(s.output_dir).name for s in stages] == ["round-01-4steps", "round-02-2steps", "round-03-1steps"]
    assert stages[0].teacher == str(class_teacher)
    assert [s.teacher for s in stages[1:]] == [str(Path(s.output_dir) / "student") for s in stages[:-1]]

    class Crash(Exception):
        pass

    original = Trainer.save_checkpoint

    def crash_in_round_two(self):
        path = original(self)
        if "round-02" in str(self.output_dir) and self.step == 1:
            raise Crash("killed in round 2 after its step-1 checkpoint")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", crash_in_round_two)
    with pytest.raises(Crash):
        run_stages(cfg)
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    runs = build_stages(cfg)
    assert [r.output_dir for r in runs] == [Path(s.output_dir) for s in stages]
    assert runs[0].finished() and not runs[1].finished()
    round1_weights = (Path(stages[0].output_dir) / "student" / "unet" / "diffusion_pytorch_model.safetensors").stat()

    started = []
    real_run = runner.run

    def recording_run(stage, evaluator=None):
        trainer = real_run(stage, evaluator)
        started.append((Path(stage.output_dir).name, trainer))
        return trainer

    monkeypatch.setattr(runner, "run", recording_run)
    run_stages(cfg)
    assert [name for name, _ in started] == ["round-02-2steps", "round-03-1steps"]  # round 1 not redone
    assert (Path(stages[0].output_dir) / "student" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime \
        == round1_weights.st_mtime
    round2 = started[0][1]
    assert round2.step == 2 and round2.micro_step == 2  # resumed at step 1, trained one more
    assert all(r.finished() for r in runs)
    # the last round's student samples in one step in the exported pipeline
    pipe = ClassConditionalPipeline.from_pretrained(Path(stages[-1].output_dir) / "student")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.config.default_steps == 1


def test_exported_schedulers_reproduce_the_own_sampler(class_teacher, tmp_path):
    """DDIM where N divides T (exact), Euler in sigma = s/a where it does not (DDIM would step by T // N)."""
    trainer = run(tiny_config("digits/progressive.yaml", class_teacher, tmp_path, *ROUND1, "train.max_steps=2",
                              "export.steps=[8]"))
    d = trainer.distiller
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    assert isinstance(d.export_scheduler(16), EulerDiscreteScheduler)
    labels = torch.tensor([0, 3, 7])
    for steps, scheduler, tol in ((8, pipe.scheduler, 1e-5), (16, d.export_scheduler(16), 1e-3)):
        noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(steps))
        ours = d.sample(noise, {"class_labels": labels}, steps, networks=trainer.export_networks())
        p = ClassConditionalPipeline(unet=pipe.unet, scheduler=scheduler, null_class=10)
        p.set_progress_bar_config(disable=True)
        theirs = p(class_labels=labels, num_inference_steps=steps, latents=noise, output_type="pt").images
        torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=tol, rtol=0)


def test_ddpm_teacher_gives_a_ddpm_student_in_plain_diffusers(uncond_teacher, tmp_path):
    trainer = run(tiny_config("digits/progressive.yaml", uncond_teacher, tmp_path, "distill.round=1",
                              "distill.start_steps=8", "train.max_steps=2", "export.steps=[4]"))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student")  # no stepdistill class involved
    assert type(pipe).__name__ == "DDPMPipeline" and isinstance(pipe.scheduler, DDIMScheduler)
    # v head; x0 clipped to the data range as the teacher's DDPMScheduler does (and the own sampler too)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.clip_sample is True
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    images = pipe(batch_size=2, num_inference_steps=4, generator=g, output_type="np").images
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 1, 8, 8, generator=g)
    ours = trainer.distiller.sample(noise, {}, 4, networks=trainer.export_networks())
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), images, atol=1e-5, rtol=0)


def test_guidance_stages_then_one_pass_per_step_at_any_scale(class_teacher, tmp_path):
    cfg = tiny_config("digits/guidance.yaml", class_teacher, tmp_path, "train.max_steps=2", "distill.progressive_start_steps=4",
                      "distill.progressive_max_steps=1", "export.steps=[4]")
    stages = [st.config for st in run_stages(cfg)]
    assert [s.method for s in stages] == ["guidance", "progressive", "progressive"]
    assert [Path(s.output_dir).name for s in stages] == ["guided", "round-01-2steps", "round-02-1steps"]
    assert stages[1].teacher == str(tmp_path / "guided" / "student") and stages[1].train.max_steps == 1
    assert stages[1].distill.guidance_scale_max == 5.0 and stages[1].distill.eval_guidance_scales == [1.0, 2.0, 4.0]
    # stage two: teacher and student both take w; the exported 1-step student runs one pass per step
    _, d, _ = build(stages[2])
    assert d.guided.dim == 256 and d.eval_guidance_scales() == [1.0, 2.0, 4.0]
    pipe = ClassConditionalPipeline.from_pretrained(Path(stages[2].output_dir) / "student")
    assert pipe.unet.config.time_cond_proj_dim == 256
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    labels = torch.tensor([2, 5])
    for scale in (1.0, 3.0):
        calls.clear()
        noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        theirs = pipe(class_labels=labels, num_inference_steps=1, guidance_scale=scale, latents=noise,
                      output_type="pt").images
        assert calls == [2]  # one pass of batch 2: no doubled CFG batch
        ours = d.sample(noise, {"class_labels": labels}, 1, networks={"student": pipe.unet}, guidance_scale=scale)
        torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5, rtol=0)
    # and the scale matters: the student was trained on a range of them
    outs = [d.sample(noise, {"class_labels": labels}, 1, networks={"student": pipe.unet}, guidance_scale=w) for w in (1.0, 5.0)]
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_text_guided_student_runs_one_pass_per_step_in_plain_diffusers(arch, request, caption_folder, tmp_path):
    """<arch>/guidance_progressive.yaml on a tiny SD1.5 / SDXL: both stages run, and the last round's student loads
    in the plain diffusers pipeline, which feeds guidance_scale as timestep_cond and makes one UNet pass per step
    (no doubled CFG batch), giving the own sampler's latents at that scale."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    teacher = request.getfixturevalue(f"{arch}_teacher")
    cfg = tiny_config(f"{arch}/guidance_progressive.yaml", teacher, tmp_path, "train.max_steps=1",
                      "train.mixed_precision='no'", "train.batch_size=2", "train.sample_every=0",
                      f"data.path={caption_folder}", "data.resolution=16", "distill.progressive_start_steps=4",
                      "distill.progressive_end_steps=2", "distill.progressive_max_steps=1", "export.steps=[4]")
    stages = [st.config for st in run_stages(cfg)]
    assert [s.method for s in stages] == ["guidance", "progressive"]
    _, d, _ = build(stages[-1])
    cls = StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(Path(stages[-1].output_dir) / "student")
    assert pipe.unet.config.time_cond_proj_dim == 256
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    prompts = ["a red cat", "a photo of the dog"]
    cond = d.teacher_info.conditioner.encode({"prompt": prompts}, "cpu")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = pipe(prompt=prompts, num_inference_steps=2, guidance_scale=7.5, latents=noise, output_type="latent").images
    assert calls == [2, 2]  # two steps, one pass of batch 2 each
    ours = d.sample(noise, cond, 2, networks={"student": pipe.unet}, guidance_scale=7.5)
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)


# ----------------------------------------------------------------------------- the shared suite


class TestProgressiveSuite(DistillerSuite):
    config_file = "digits/progressive.yaml"
    overrides = ROUND1


class TestProgressiveUnconditionalSuite(DistillerSuite):
    config_file = "digits/progressive.yaml"
    teacher = "uncond_teacher"
    overrides = ROUND1


class TestGuidanceSuite(DistillerSuite):
    config_file = "digits/guidance.yaml"
    overrides = ("distill.progressive_start_steps=0",)


def test_quickstart_gives_every_round_and_scale_its_row_and_the_teacher_the_same_points(tmp_path, monkeypatch):
    """The quickstart mechanism for multi-run methods: a row per round (and per guidance scale for guided
    students), and teacher rows at the same (steps, guidance) points."""
    from tiny_models import save_class_teacher

    from stepdistill import quickstart as qs

    teacher = save_class_teacher(tmp_path / "teacher", size=16)  # the digits classifier needs 16x16
    monkeypatch.setattr(qs, "DIGITS_TEACHER", teacher)
    monkeypatch.setattr(qs, "TEACHER_STEPS", (1,))
    fast = ["train.max_steps=1", "train.progress_bar=false", "train.report_to=none", "train.batch_size=4",
            "train.num_sample_images=2"]
    rows = qs.quickstart(["progressive"], tmp_path / "qs", num_samples=20, overrides=[*fast, "distill.start_steps=4"])
    students = [r for r in rows if r["model"] == "progressive"]
    assert [(r["steps"], r["run"]) for r in students] == [(2, "round-01-2steps"), (1, "round-02-1steps")]
    assert {r["steps"] for r in rows if r["model"] == "teacher"} == {1, 2}
    rows = qs.quickstart(["guidance"], tmp_path / "qs", num_samples=20,
                         overrides=[*fast, "distill.progressive_start_steps=2", "distill.progressive_max_steps=1",
                                    "distill.eval_guidance_scales=[1.0,3.0]", "export.steps=[2]"])
    students = [(r["steps"], r["guidance"], r["run"]) for r in rows if r["model"] == "guidance"]
    assert students == [(2, 1.0, "guided"), (2, 3.0, "guided"),
                        (1, 1.0, "progressive/round-01-1steps"), (1, 3.0, "progressive/round-01-1steps")]
    teacher_points = {(r["steps"], r.get("guidance", 1.0)) for r in rows if r["model"] == "teacher"}
    assert teacher_points == {(1, 1.0), (2, 1.0), (2, 3.0), (1, 3.0)}
    assert all(math.isfinite(r["fid"]) for r in rows)


@pytest.mark.slow
def test_quickstart_progressive_students_beat_the_teachers_ddim_at_one_and_two_steps(quickstart_dir):
    """The embedded default at full length: every round's student beats the teacher's DDIM at 1 and 2 steps."""
    import json

    from stepdistill.cli import main

    assert main(["quickstart", "--method", "progressive", "--output-dir", str(quickstart_dir),
                 "train.progress_bar=false"]) == 0
    fid = {(r["model"], r["steps"]): r["fid"] for r in json.loads((quickstart_dir / "results.json").read_text())}
    assert fid["progressive", 1] < fid["teacher", 2] < fid["teacher", 1]
    assert fid["progressive", 2] < fid["teacher", 2]
