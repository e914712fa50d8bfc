import torch
from diffusers import DiffusionPipeline, LCMScheduler

from distiller_suite import DistillerSuite
from helpers import assert_pipeline_matches_own_sampler, tiny_config
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.runner import build, run


def _distiller(teacher, tmp_path, *opts):
    return build(tiny_config("digits/consistency.yaml", teacher, tmp_path, *opts))[1]


def test_boundary_condition_is_the_identity_at_the_clean_end(class_teacher, tmp_path):
    d = _distiller(class_teacher, tmp_path)
    x = torch.randn(2, 1, 8, 8)
    f = d.consistency_fn(d.student_denoiser, x, torch.zeros(2), {"class_labels": torch.tensor([1, 2])})
    torch.testing.assert_close(f, x)
    c_skip, c_out = d.boundary(torch.tensor([1.0]), x)
    assert c_skip.item() < 1e-6 and abs(c_out.item() - 1) < 1e-6  # at the top f is the network's x0


def test_sampling_times_match_lcm_scheduler(class_teacher, tmp_path):
    d = _distiller(class_teacher, tmp_path)
    sched = d.export_scheduler(1)
    for steps in (1, 2, 4, 8):
        sched.set_timesteps(steps)
        ours = d.teacher.schedule.model_timestep(d.sampling_times(steps))
        torch.testing.assert_close(ours, sched.timesteps.float())


def test_target_network_is_the_ema_and_loss_is_finite(class_teacher, tmp_path):
    trainer = run(tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=2"))
    target = trainer.ema.module("student", "target")
    assert trainer.ema.rates("student") == {"target": 0.95}
    student = dict(trainer.distiller.student.named_parameters())
    # after two updates target = 0.95^2 teacher + (1 - 0.95^2) weighted student: between the two, not equal to either
    name = "conv_in.weight"
    assert not torch.equal(dict(target.named_parameters())[name], student[name])


def test_own_sampler_equals_plain_diffusers_pipeline(class_teacher, tmp_path):
    trainer = run(tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=2"))
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert_pipeline_matches_own_sampler(trainer, pipe, (1, 4))


def test_sigma_data_is_folded_into_the_exported_timestep_scaling(class_teacher, tmp_path):
    """LCMScheduler fixes sigma_data = 0.5; the scalings depend on timestep_scaling / sigma_data alone, so a student
    trained at sigma_data 0.25 exports timestep_scaling 20 and plain diffusers samples it as the own sampler."""
    trainer = run(tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "train.max_steps=2",
                              "distill.sigma_data=0.25"))
    d = trainer.distiller
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert pipe.scheduler.config.timestep_scaling == 20.0
    k = torch.tensor([0, 1, 19, 499, 999])
    ours = d.timeline.boundary(d.teacher.schedule.t_of_timestep(k))
    theirs = pipe.scheduler.get_scalings_for_boundary_condition_discrete(k.double())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-6)
    lcm_default = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=10.0)
    assert not torch.allclose(lcm_default.get_scalings_for_boundary_condition_discrete(k.double())[0], theirs[0])
    assert_pipeline_matches_own_sampler(trainer, pipe, (1, 4))


def test_unconditional_student_loads_in_plain_diffusers(uncond_teacher, tmp_path):
    cfg = tiny_config("digits/consistency.yaml", uncond_teacher, tmp_path, "train.max_steps=2")
    trainer = run(cfg)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student")  # no stepdistill class involved
    assert type(pipe).__name__ == "DDPMPipeline" and isinstance(pipe.scheduler, LCMScheduler)
    g = torch.Generator().manual_seed(0)
    images = pipe(batch_size=2, num_inference_steps=2, generator=g, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    # and it is the trained student: the same noise through stepdistill's own sampler gives the same images
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 1, 8, 8, generator=g)
    ours = trainer.distiller.sample(noise, {}, 2, generator=g, networks=trainer.export_networks())
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), images, atol=1e-4, rtol=1e-4)


class TestConsistencySuite(DistillerSuite):
    config_file = "digits/consistency.yaml"


class TestConsistencyUnconditionalSuite(DistillerSuite):
    config_file = "digits/consistency.yaml"
    teacher = "uncond_teacher"
