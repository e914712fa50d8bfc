import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from stepdistill.errors import ConfigError, StepdistillError
from stepdistill.schedules import FlowSchedule, VPSchedule, sample_u_shaped, schedule_from_scheduler_config


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_alphas_at_integer_timesteps_match_diffusers(beta_schedule):
    sched = DDPMScheduler(beta_schedule=beta_schedule)
    vp = VPSchedule.from_scheduler_config(sched.config)
    k = torch.tensor([0, 1, 19, 500, 998, 999])
    a, s = vp.alpha_sigma(vp.t_of_timestep(k))
    abar = sched.alphas_cumprod[k]
    torch.testing.assert_close(a, abar.sqrt(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s, (1 - abar).sqrt(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vp.model_timestep(vp.t_of_timestep(k)), k.float())


def test_vp_clean_end_and_interpolation_is_monotone():
    vp = VPSchedule.from_scheduler_config(DDPMScheduler(beta_schedule="scaled_linear").config)
    a0, s0 = vp.alpha_sigma(torch.tensor([0.0]))
    assert a0.item() == 1.0 and s0.item() == 0.0
    t = torch.linspace(0, 1, 5001)
    a, s = vp.alpha_sigma(t)
    assert bool((a[1:] <= a[:-1]).all()) and bool((s[1:] >= s[:-1]).all())
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(a), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 4, 50])
def test_trailing_grid_matches_ddim_timesteps(steps):
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    sched.set_timesteps(steps)
    vp = VPSchedule.from_scheduler_config(sched.config)
    grid = vp.sampling_grid(steps, "trailing")
    torch.testing.assert_close(vp.model_timestep(grid[:-1]), sched.timesteps.float())
    assert grid[0] == 1.0 and grid[-1] == 0.0  # one trailing step starts at t=999 and ends clean


def test_leading_spacing_one_step_starts_at_zero():
    """The pitfall the trailing baseline avoids: a 1-step 'leading' DDIM starts at timestep 0."""
    vp = VPSchedule.from_scheduler_config(DDIMScheduler().config)
    grid = vp.sampling_grid(1, "leading")
    assert vp.model_timestep(grid[:1]).item() == 0.0


def test_flow_schedule_grid_matches_flowmatch_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    fs = FlowSchedule.from_scheduler_config(sched.config)
    torch.testing.assert_close(fs.sampling_grid(8), sched.sigmas.float(), atol=1e-6, rtol=1e-6)
    a, s = fs.alpha_sigma(torch.tensor([0.25]))
    assert a.item() == 0.75 and s.item() == 0.25


def test_u_shaped_samples_favour_both_ends():
    t = sample_u_shaped(200_000, a=4.0, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    ends = ((t < 0.1) | (t > 0.9)).float().mean().item()
    middle = ((t > 0.4) & (t < 0.6)).float().mean().item()
    # density ∝ cosh(4 (t - 1/2)): mass in the outer fifth vs the middle fifth is about 3.6x
    assert ends > 3 * middle
    assert abs(t.mean().item() - 0.5) < 0.01


def test_flow_student_grids_are_pcm_phase_edges_not_the_teacher_schedulers():
    """PCM's SD3 code puts K phase edges at shift(k / K); FlowMatchEuler.set_timesteps(K) ends near 0.009 instead."""
    fs = FlowSchedule(1000, shift=3.0)
    torch.testing.assert_close(fs.sampling_grid(4, "shifted"), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(fs.sampling_grid(2, "shifted"), torch.tensor([1.0, 0.75, 0.0]))
    # the teacher scheduler's grids, kept for the teacher's own baseline: a 2-step one is a 1-step one plus ~identity
    assert abs(fs.sampling_grid(2)[1].item() - 0.0089) < 1e-4
    # nested: the grid for K steps is every other point of the one for 2K
    for k in (1, 2, 4, 8):
        torch.testing.assert_close(fs.sampling_grid(2 * k, "shifted")[::2], fs.sampling_grid(k, "shifted"))
    # unshifted() gives the sigmas FlowMatchEuler.set_timesteps(sigmas=...) shifts back onto the grid
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=fs.unshifted(fs.sampling_grid(4, "shifted")[:-1]).tolist())
    torch.testing.assert_close(sched.sigmas.float(), fs.sampling_grid(4, "shifted"), atol=1e-6, rtol=1e-6)
    with pytest.raises(StepdistillError, match="spacing"):
        fs.sampling_grid(4, "leading")


def test_zero_terminal_snr_abar_is_finite_and_monotone_up_to_t_1():
    """rescale_betas_zero_snr ends at abar = 0: no NaN from log 0, monotone into the pure-noise end."""
    sched = DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    vp = VPSchedule.from_scheduler_config(sched.config)
    assert sched.alphas_cumprod[-1] == 0
    t = torch.cat([torch.linspace(0, 1, 20001), torch.tensor([0.9995, 1 - 1e-7, 1.0])]).sort().values
    a, s = vp.alpha_sigma(t)
    assert bool(torch.isfinite(a).all()) and bool(torch.isfinite(s).all())
    assert bool((a[1:] <= a[:-1]).all()) and bool((s[1:] >= s[:-1]).all())
    assert a[-1].item() == 0.0 and s[-1].item() == 1.0
    a_k, _ = vp.alpha_sigma(vp.t_of_timestep(torch.tensor([998, 999])))
    torch.testing.assert_close(a_k, sched.alphas_cumprod[[998, 999]].sqrt(), rtol=1e-5, atol=1e-7)
    assert 0 < vp.alpha_sigma(torch.tensor([0.9995]))[0].item() < a_k[0].item()  # between timesteps 998 and 999


def test_vp_schedule_reads_trained_betas_and_sigmoid_and_refuses_unknown_beta_schedules():
    betas = torch.linspace(1e-4, 0.03, 100)
    vp = VPSchedule.from_scheduler_config(DDPMScheduler(num_train_timesteps=100, trained_betas=betas.numpy()).config)
    torch.testing.assert_close(vp.alpha_sigma(torch.tensor([1.0]))[0] ** 2, torch.cumprod(1 - betas, 0)[-1:].float())
    sig = VPSchedule.from_scheduler_config(DDPMScheduler(beta_schedule="sigmoid").config)
    lin = VPSchedule.from_scheduler_config(DDPMScheduler(beta_schedule="linear").config)
    assert (sig.alpha_sigma(torch.tensor([0.5]))[0] - lin.alpha_sigma(torch.tensor([0.5]))[0]).abs() > 1e-3
    with pytest.raises(ConfigError, match="beta_schedule='laplace' is not supported"):
        VPSchedule.from_scheduler_config({**DDPMScheduler().config, "beta_schedule": "laplace"})


@pytest.mark.parametrize("setting,value", [("timestep_type", "continuous"), ("use_flow_sigmas", True),
                                           ("snr_shift_scale", 3.0)])
def test_vp_schedule_refuses_settings_that_change_its_noise_levels(setting, value):
    with pytest.raises(ConfigError, match=f"setting {setting}={value!r}"):
        schedule_from_scheduler_config({**DDIMScheduler().config, setting: value})


def test_vp_sampler_settings_leave_the_schedule_unchanged():
    """timestep_spacing, Karras sigmas, clipping: how a diffusers sampler walks the schedule, not the schedule."""
    base = VPSchedule.from_scheduler_config(EulerDiscreteScheduler().config)
    other = VPSchedule.from_scheduler_config(EulerDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="leading",
                                                                    steps_offset=1).config)
    torch.testing.assert_close(base.table, other.table)


def test_flow_schedule_reads_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    fs = schedule_from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=2.5).config)
    assert isinstance(fs, FlowSchedule) and fs.shift == 2.5
    torch.testing.assert_close(fs.shifted(torch.tensor(0.5)), torch.tensor(2.5 * 0.5 / (1 + 1.5 * 0.5)))


@pytest.mark.parametrize("setting,value", [("use_dynamic_shifting", True), ("shift_terminal", 0.02),
                                           ("use_karras_sigmas", True), ("use_exponential_sigmas", True),
                                           ("use_beta_sigmas", True), ("invert_sigmas", True),
                                           ("stochastic_sampling", True)])
def test_flow_schedule_refuses_sigma_settings_it_does_not_model(setting, value):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {**FlowMatchEulerDiscreteScheduler(shift=3.0).config, setting: value}
    with pytest.raises(ConfigError, match=f"setting {setting}={value!r}"):
        schedule_from_scheduler_config(config)


def test_dynamic_shifting_error_says_how_to_fix_it_and_unknown_settings_are_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    with pytest.raises(ConfigError, match=r"shift=exp\(mu\)"):
        schedule_from_scheduler_config(config)
    with pytest.raises(ConfigError, match="setting warp=2 is unknown"):
        schedule_from_scheduler_config({**FlowMatchEulerDiscreteScheduler().config, "warp": 2})
