"""TCD: the semi-linear trajectory map, s drawn below the target time, strategic stochastic sampling = TCDScheduler."""

import pytest
import torch
from diffusers import TCDScheduler

from distiller_suite import DistillerSuite
from helpers import assert_pipeline_matches_own_sampler, tiny_config
from stepdistill.distillers.consistency import jump
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.runner import build, run


def test_jump_is_identity_at_s_equals_t_and_x0_at_zero(class_teacher, tmp_path):
    d = build(tiny_config("digits/tcd.yaml", class_teacher, tmp_path))[1]
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.3, 0.7, 1.0])
    cond = {"class_labels": torch.tensor([1, 2, 3])}
    with torch.no_grad():
        torch.testing.assert_close(jump(d.student_denoiser, x, t, t, cond), x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(jump(d.student_denoiser, x, t, torch.zeros(3), cond),
                                   d.student_denoiser.x0(x, t, cond))


def test_landing_time_lies_on_the_grid_below_the_target_time(class_teacher, tmp_path):
    d = build(tiny_config("digits/tcd.yaml", class_teacher, tmp_path))[1]
    t, t_prev, s = d.draw_times(4000, "cpu", 0)
    assert (s <= t_prev + 1e-7).all() and (t_prev < t).all()
    n = d.config.num_ddim_timesteps
    torch.testing.assert_close(s * n, (s * n).round())
    assert (s == 0).any() and (s == t_prev).any()  # both ends of [0, t_{n-1}] are drawn


def test_sampling_times_match_tcd_scheduler(class_teacher, tmp_path):
    d = build(tiny_config("digits/tcd.yaml", class_teacher, tmp_path))[1]
    sched = d.export_scheduler(4)
    assert isinstance(sched, TCDScheduler)
    for steps in (1, 2, 4, 8):
        sched.set_timesteps(steps)
        torch.testing.assert_close(d.teacher.schedule.model_timestep(d.sampling_times(steps)), sched.timesteps.float())


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_own_sampler_equals_plain_pipeline_with_tcd_scheduler(class_teacher, tmp_path, gamma):
    trainer = run(tiny_config("digits/tcd.yaml", class_teacher, tmp_path, "train.max_steps=2", f"distill.gamma={gamma}"))
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert isinstance(pipe.scheduler, TCDScheduler)
    assert_pipeline_matches_own_sampler(trainer, pipe, (1, 2, 4), pipe_kwargs={"eta": gamma})


class TestTCDSuite(DistillerSuite):
    config_file = "digits/tcd.yaml"


@pytest.mark.parametrize("method", ["lcm", "tcd"])
def test_flow_teacher_students_sample_like_flowmatch_euler(method, sd3_teacher, prompt_file, tmp_path):
    """On a flow-matching teacher, LCM exports FlowMatchEuler with stochastic_sampling (x0, then fresh noise at the
    next sigma) and TCD with gamma 0 the deterministic Euler step; plain SD3 sampling equals stepdistill's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    cfg = tiny_config(f"digits/{method}.yaml", sd3_teacher, tmp_path, "train.max_steps=2", "train.batch_size=2",
                      "data.dataset=prompts", f"data.path={prompt_file}", "distill.data_free_steps=1",
                      "distill.guidance_embedding=false", "distill.guidance_scale_min=1.5", "distill.guidance_scale_max=2",
                      "distill.gamma=0" if method == "tcd" else "distill.huber_c=0.001")
    trainer = run(cfg)
    d = trainer.distiller
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "student", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.stochastic_sampling == (method == "lcm")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog"]
    cond = d.teacher_info.conditioner.encode({"prompt": prompts}, "cpu")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3):
        torch.manual_seed(1)  # SD3's pipeline draws the stochastic sampler's noise from the global generator
        ours = d.sample(noise, cond, steps, networks=trainer.export_networks())
        torch.manual_seed(1)
        theirs = pipe(prompt=prompts, num_inference_steps=steps, latents=noise.clone(), guidance_scale=1.0,
                      output_type="latent").images
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)
