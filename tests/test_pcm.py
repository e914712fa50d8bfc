"""Multi-phase consistency: phase edges = the exported scheduler's grid, Hyper-SD stage plan, the edge target, and
the SD3 (flow-matching) PCM LoRA loaded back in plain diffusers."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from distiller_suite import DistillerSuite
from helpers import tiny_config
from stepdistill.errors import ConfigError
from stepdistill.pipelines import ClassConditionalPipeline, FlowGridScheduler
from stepdistill.runner import build, run

LORA = ["distill.lora_rank=4", "distill.lora_alpha=8"]


def _pcm(teacher, tmp_path, *opts):
    return build(tiny_config("digits/pcm.yaml", teacher, tmp_path, *opts))[1]


def test_stage_plan_halves_phases(class_teacher, tmp_path):
    d = _pcm(class_teacher, tmp_path, "distill.stage_phases=[8,4,2,1]", "distill.stage_steps=10")
    assert [d.phases_at(s) for s in (0, 9, 10, 25, 30, 10_000)] == [8, 8, 4, 2, 1, 1]
    d = _pcm(class_teacher, tmp_path, "distill.stage_phases=[]", "distill.stage_steps=0", "distill.num_phases=3")
    assert d.phases_at(0) == d.phases_at(999) == 3


def test_each_stage_leaves_its_k_step_student(class_teacher, tmp_path):
    """Hyper-SD ships one student per stage: with K = 4 -> 2 -> 1, the run exports the K=4 student after stage one
    and the K=2 student after stage two (loadable pipelines with a DDIM scheduler at K steps), and the final K=1
    student as usual. The stage-one export holds the weights a run stopped at that step ends with."""
    import json

    opts = ["distill.stage_phases=[4,2,1]", "distill.stage_steps=2", "train.lr_scheduler=constant",
            "train.ema_decays=[]", "train.export_weights=student"]
    run(tiny_config("digits/pcm.yaml", class_teacher, tmp_path / "full", "train.max_steps=5", *opts))
    for folder, steps in (("student-4phases", 4), ("student-2phases", 2)):
        pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "full" / folder)
        assert pipe.config.default_steps == steps
        assert json.loads((tmp_path / "full" / folder / "stepdistill.json").read_text())["steps"] == steps
        assert (tmp_path / "full" / "samples" / f"{folder}-{steps}step.png").is_file()
    assert not (tmp_path / "full" / "student-1phases").exists()  # the last stage is the final student
    assert ClassConditionalPipeline.from_pretrained(tmp_path / "full" / "student").config.default_steps == 1

    run(tiny_config("digits/pcm.yaml", class_teacher, tmp_path / "short", "train.max_steps=2", *opts))
    stage_one = ClassConditionalPipeline.from_pretrained(tmp_path / "full" / "student-4phases").unet.state_dict()
    at_step_two = ClassConditionalPipeline.from_pretrained(tmp_path / "short" / "student").unet.state_dict()
    assert not (tmp_path / "short" / "student-4phases").exists()  # a run's last step is its final export
    for k, v in at_step_two.items():
        torch.testing.assert_close(stage_one[k], v, rtol=0, atol=0)
    final = ClassConditionalPipeline.from_pretrained(tmp_path / "full" / "student").unet.state_dict()
    assert any(not torch.equal(final[k], v) for k, v in at_step_two.items())


def test_teacher_step_stops_at_the_phase_edge_and_the_target_is_then_x_prev(class_teacher, tmp_path):
    d = _pcm(class_teacher, tmp_path, "distill.stage_phases=[4]", "distill.stage_steps=0")
    t, t_end, edge = d.draw_times(2000, "cpu", 0)
    edges = torch.tensor([0.0, 0.25, 0.5, 0.75])  # DDIM 'trailing' at 4 steps: timesteps 999, 749, 499, 249
    torch.testing.assert_close(edge, edges[torch.searchsorted(edges, t - 1e-6) - 1])
    assert (t_end >= edge).all() and (t_end < t).all()
    assert ((t_end == edge) & (t_end > t - 1.5 / 50)).any()
    x = torch.randn(2, 1, 8, 8)
    s = torch.tensor([0.25, 0.5])
    with torch.no_grad():
        target = d.target_map(d.student_denoiser, x, s, s, {"class_labels": torch.tensor([1, 2])})
    torch.testing.assert_close(target, x, atol=1e-5, rtol=1e-5)


def test_own_sampler_equals_plain_pipeline_with_ddim_at_the_edges(class_teacher, tmp_path):
    trainer = run(tiny_config("digits/pcm.yaml", class_teacher, tmp_path, "train.max_steps=2"))
    d = trainer.distiller
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    labels = torch.tensor([0, 3, 7])
    for steps in (1, 2, 4):
        pipe.scheduler.set_timesteps(steps)
        torch.testing.assert_close(d.teacher.schedule.model_timestep(d.sampling_times(steps)[:-1]),
                                   pipe.scheduler.timesteps.float())
        noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(steps))
        ours = d.sample(noise, {"class_labels": labels}, steps, networks=trainer.export_networks())
        theirs = pipe(class_labels=labels, num_inference_steps=steps, latents=noise, output_type="pt").images
        torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-4, rtol=1e-4)


def test_flow_phase_edges_are_pcms_shifted_k_over_k(flow_class_teacher, tmp_path):
    """PCM's SD3 edges shift(k / K): K = 4 at shift 3 gives 1, 0.9, 0.75, 0.5, 0 (FlowMatchEuler.set_timesteps(4) gave
    1, 0.858, 0.602, 0.0089, 0); training draws its lower edges among them, and the export samples them."""
    pcm_edges = {4: [1.0, 0.9, 0.75, 0.5, 0.0], 2: [1.0, 0.75, 0.0]}
    for k, edges in pcm_edges.items():
        d = _pcm(flow_class_teacher, tmp_path, f"distill.stage_phases=[{k}]", "distill.stage_steps=0")
        torch.testing.assert_close(d.timeline.phase_edges(k), torch.tensor(edges))
        t, t_end, edge = d.draw_times(4000, "cpu", 0)
        assert set(edge.tolist()) == set(torch.tensor(edges[1:]).tolist())  # every lower edge, and only those
        assert (t_end >= edge).all() and (edge < t).all()
        sched = d.export_scheduler(k)
        assert isinstance(sched, FlowGridScheduler) and sched.config.gamma == 0 and not sched.config.stochastic_sampling
        sched.set_timesteps(k)
        torch.testing.assert_close(sched.sigmas, torch.tensor(edges), atol=1e-6, rtol=0)


def test_k_not_dividing_t_exports_the_trained_edges(class_teacher, tmp_path):
    """K = 3 over T = 1000: training's edges are timesteps 999, 666, 332 (then the clean end); DDIM would step
    666 -> 333, so the export is Euler on exactly those timesteps, and plain diffusers samples as the own sampler."""
    trainer = run(tiny_config("digits/pcm.yaml", class_teacher, tmp_path, "train.max_steps=1", "distill.stage_phases=[3]",
                              "distill.stage_steps=0", "export.steps=[3]"))
    d = trainer.distiller
    edges = d.timeline.phase_edges(3)
    torch.testing.assert_close(d.teacher.schedule.model_timestep(edges[:-1]), torch.tensor([999.0, 666.0, 332.0]))
    _, _, drawn = d.draw_times(4000, "cpu", 0)
    assert set(drawn.tolist()) == set(edges[1:].tolist())
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "student")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(3)
    torch.testing.assert_close(pipe.scheduler.timesteps.float(), torch.tensor([999.0, 666.0, 332.0]))
    labels = torch.tensor([0, 3, 7])
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = d.sample(noise, {"class_labels": labels}, 3, networks=trainer.export_networks())
    theirs = pipe(class_labels=labels, num_inference_steps=3, latents=noise, output_type="pt").images
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("opts, message", [
    (["distill.num_phases=4", "distill.stage_phases=[4,2,1]"], "num_phases and distill.stage_phases both set K"),
    (["distill.stage_phases=[2,4]"], r"stage_phases = \[2, 4\] rises"),
    (["distill.stage_phases=[]", "distill.stage_steps=5"], "stage_steps is read only with two or more"),
    (["distill.stage_phases=[4]", "distill.stage_steps=5"], "stage_steps is read only with two or more"),
    (["distill.sigma_data=0.3"], "sigma_data is not read by pcm"),
    (["distill.timestep_scaling=10"], "timestep_scaling is not read by pcm"),
])
def test_pcm_refuses_settings_no_code_reads(class_teacher, tmp_path, opts, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("digits/pcm.yaml", class_teacher, tmp_path, *opts)


def test_sd3_pcm_lora_loads_in_plain_diffusers(sd3_teacher, prompt_file, tmp_path):
    """sd3/pcm.yaml on a tiny SD3 (flow matching, shift 3), prompt-only data: the merged export and the teacher +
    load_lora_weights sample the same latents as stepdistill's sampler on the trained sigmas shift(k / 4) = 1, 0.9,
    0.75, 0.5, 0 (FlowGridScheduler at num_inference_steps=4); diffusers' own FlowMatchEulerDiscreteScheduler does
    the same given the model card's sigmas= list."""
    cfg = tiny_config("sd3/pcm.yaml", sd3_teacher, tmp_path, "train.max_steps=2", "train.mixed_precision='no'",
                      "train.batch_size=2", "data.dataset=prompts", f"data.path={prompt_file}",
                      "distill.data_free_steps=2", *LORA)
    trainer = run(cfg)
    d = trainer.distiller
    student_dir = Path(cfg.output_dir) / "student"
    prompts = ["a red cat", "a blue dog"]
    cond = d.teacher_info.conditioner.encode({"prompt": prompts}, "cpu")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = d.sample(noise, cond, 4, networks=trainer.export_networks())
    loaded = StableDiffusion3Pipeline.from_pretrained(sd3_teacher, text_encoder_3=None, tokenizer_3=None)
    loaded.scheduler = FlowGridScheduler.from_pretrained(student_dir, subfolder="scheduler")
    loaded.load_lora_weights(student_dir / "lora")
    merged = StableDiffusion3Pipeline.from_pretrained(student_dir, text_encoder_3=None, tokenizer_3=None)
    trained = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    for pipe in (merged, loaded):
        assert type(pipe.scheduler) is FlowGridScheduler
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(prompt=prompts, num_inference_steps=4, latents=noise.clone(), guidance_scale=1.0,
                      output_type="latent").images
        torch.testing.assert_close(pipe.scheduler.sigmas, trained, atol=1e-6, rtol=0)  # the sigmas it sampled on
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)
    # without stepdistill's class: diffusers' scheduler and the sigmas list the model card gives
    sigmas = d.teacher.schedule.unshifted(trained[:-1]).tolist()
    card = (student_dir / "README.md").read_text()
    assert f"sigmas={[round(v, 6) for v in sigmas]}" in card and "num_inference_steps=4" in card
    plain = StableDiffusion3Pipeline.from_pretrained(
        student_dir, text_encoder_3=None, tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(merged.scheduler.config))
    assert type(plain.scheduler) is FlowMatchEulerDiscreteScheduler
    plain.set_progress_bar_config(disable=True)
    theirs = plain(prompt=prompts, num_inference_steps=4, sigmas=sigmas, latents=noise.clone(), guidance_scale=1.0,
                   output_type="latent").images
    torch.testing.assert_close(plain.scheduler.sigmas, trained, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)


class TestPCMSuite(DistillerSuite):
    config_file = "digits/pcm.yaml"
    overrides = ("distill.stage_steps=1",)  # crosses a stage boundary within the suite's few steps


class TestSD3PCMSuite(DistillerSuite):
    config_file = "sd3/pcm.yaml"
    teacher = "sd3_teacher"
    overrides = ("train.mixed_precision='no'", "train.batch_size=2", "distill.data_free_steps=1", *LORA)

    @classmethod
    def extra_overrides(cls, request):
        return ["data.dataset=prompts", f"data.path={request.getfixturevalue('prompt_file')}"]
