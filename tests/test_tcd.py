"""TCD: the semi-linear trajectory map, s drawn below the target time, strategic stochastic sampling = TCDScheduler."""

import pytest
import torch
from diffusers import TCDScheduler

from distiller_suite import DistillerSuite
from helpers import assert_pipeline_matches_own_sampler, tiny_config
from stepdistill.distillers.consistency import jump
from stepdistill.errors import ConfigError
from stepdistill.pipelines import ClassConditionalPipeline, FlowGridScheduler
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


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_flow_tcd_export_samples_as_the_own_sampler_with_its_renoising(flow_class_teacher, tmp_path, gamma):
    """A flow teacher's TCD student exports FlowGridScheduler with gamma: from the same noise and the same re-noising
    generator, the plain pipeline's images equal stepdistill's sample_tcd at every step count (at 0.3 the re-noising
    matters: another generator gives other images)."""
    trainer = run(tiny_config("digits/tcd.yaml", flow_class_teacher, tmp_path, "train.max_steps=2",
                              f"distill.gamma={gamma}"))
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert type(pipe.scheduler) is FlowGridScheduler and pipe.scheduler.config.gamma == gamma
    pipe.set_progress_bar_config(disable=True)
    assert_pipeline_matches_own_sampler(trainer, pipe, (1, 2, 4))
    labels = torch.tensor([0, 3, 7])
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = (pipe(class_labels=labels, num_inference_steps=4, latents=noise, generator=torch.Generator().manual_seed(s),
                 output_type="pt").images for s in (1, 2))
    assert torch.equal(a, b) == (gamma == 0.0)


@pytest.mark.parametrize("method, gamma", [("lcm", None), ("tcd", 0.0), ("tcd", 0.3)])
def test_flow_teacher_students_sample_on_the_trained_grid_in_plain_sd3(method, gamma, sd3_teacher, prompt_file,
                                                                       tmp_path):
    """On a flow-matching SD3 teacher, LCM exports consistency sampling (x0, then fresh noise at the next sigma) and
    TCD its gamma step, both on sigmas shift(k / K); plain StableDiffusion3Pipeline equals stepdistill's sampler,
    re-noising included (SD3's pipeline hands the scheduler no generator: scheduler.noise_generator)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    cfg = tiny_config(f"digits/{method}.yaml", sd3_teacher, tmp_path, "train.max_steps=2", "train.batch_size=2",
                      "data.dataset=prompts", f"data.path={prompt_file}", "distill.data_free_steps=1",
                      "distill.guidance_embedding=false", "distill.guidance_scale_min=1.5", "distill.guidance_scale_max=2",
                      f"distill.gamma={gamma}" if method == "tcd" else "distill.huber_c=0.001")
    trainer = run(cfg)
    d = trainer.distiller
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "student", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and type(pipe.scheduler) is FlowGridScheduler
    assert pipe.scheduler.config.stochastic_sampling == (method == "lcm")
    assert pipe.scheduler.config.gamma == (gamma or 0.0)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog"]
    cond = d.teacher_info.conditioner.encode({"prompt": prompts}, "cpu")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3):
        ours = d.sample(noise, cond, steps, networks=trainer.export_networks(), generator=torch.Generator().manual_seed(1))
        pipe.scheduler.noise_generator = torch.Generator().manual_seed(1)
        theirs = pipe(prompt=prompts, num_inference_steps=steps, latents=noise.clone(), guidance_scale=1.0,
                      output_type="latent").images
        torch.testing.assert_close(pipe.scheduler.sigmas, d.teacher.schedule.sampling_grid(steps, "shifted"))
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)


def test_tcd_and_flow_consistency_refuse_boundary_settings(class_teacher, flow_class_teacher, tmp_path):
    """sigma_data and timestep_scaling shape LCM's boundary scalings only: TCD's DDIM jump and a flow teacher's
    f(x, t) = x - t u never read them."""
    for key in ("sigma_data=0.3", "timestep_scaling=5"):
        with pytest.raises(ConfigError, match=f"{key.split('=')[0]} is not read by tcd"):
            tiny_config("digits/tcd.yaml", class_teacher, tmp_path, f"distill.{key}")
        with pytest.raises(ConfigError, match=f"{key.split('=')[0]} is not read by a flow-matching"):
            build(tiny_config("digits/lcm.yaml", flow_class_teacher, tmp_path, f"distill.{key}"))
