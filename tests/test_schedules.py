import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from stepdistill.errors import StepdistillError
from stepdistill.schedules import FlowSchedule, VPSchedule, sample_u_shaped


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
