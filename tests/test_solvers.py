import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from stepdistill import solvers
from stepdistill.samplers import sample_ode
from stepdistill.denoiser import EpsDenoiser, denoiser_for
from stepdistill.schedules import FlowSchedule, VPSchedule
from tiny_models import tiny_unet


def _diffusers_vs_ours(sched, steps, spacing="trailing", clip_x0=None):
    """Max difference between diffusers' DDIM loop and stepdistill's sampler on the same model and noise."""
    model = tiny_unet()
    sched.set_timesteps(steps)
    den = denoiser_for(model, sched.config)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x).prev_sample
        ours = sample_ode(den, noise, den.schedule.sampling_grid(steps, spacing), clip_x0=clip_x0)
    return (ours - x).abs().max().item()


@pytest.mark.parametrize("spacing,alpha_one", [("trailing", True), ("leading", True), ("leading", False)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_50_step_ddim_matches_diffusers(spacing, alpha_one, prediction_type):
    sched = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False,
                          timestep_spacing=spacing, set_alpha_to_one=alpha_one)
    assert _diffusers_vs_ours(sched, 50, spacing) < 1e-4


def test_ddim_with_clipping_matches_diffusers_clip_sample():
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True,
                          timestep_spacing="trailing")
    assert _diffusers_vs_ours(sched, 4, clip_x0=1.0) < 1e-4


class GaussianEps(nn.Module):
    """The exact eps-prediction for data ~ N(0, sd^2): the probability-flow ODE is then solvable in closed form."""

    def __init__(self, schedule, sd=0.5):
        super().__init__()
        self.schedule, self.sd = schedule, sd
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, sample, timestep, return_dict=False):
        t = self.schedule.t_of_timestep(timestep).float() if isinstance(self.schedule, VPSchedule) \
            else timestep / self.schedule.num_train_timesteps
        a, s = self.schedule.alpha_sigma(t)
        a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
        x0 = a * self.sd ** 2 * sample / (a ** 2 * self.sd ** 2 + s ** 2)
        return ((sample - a * x0) / s,)


def karras_times(schedule, n, lam_max=80.0, lam_min=0.002, rho=7.0):
    """EDM's sigma grid (here sigma = s/a), mapped back to t by bisection, then the clean end."""
    ramp = torch.linspace(0, 1, n)
    lam = (lam_max ** (1 / rho) + ramp * (lam_min ** (1 / rho) - lam_max ** (1 / rho))) ** rho
    lo, hi = torch.zeros(n), torch.ones(n)
    for _ in range(60):
        mid = (lo + hi) / 2
        a, s = schedule.alpha_sigma(mid)
        below = s / a < lam
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.cat([(lo + hi) / 2, torch.zeros(1)])


@pytest.mark.parametrize("schedule", [FlowSchedule(), VPSchedule(DDIMScheduler(beta_schedule="scaled_linear").alphas_cumprod)])
def test_euler_is_first_order_and_heun_second_order_on_the_exact_gaussian_ode(schedule):
    den = EpsDenoiser(GaussianEps(schedule), schedule)
    x1 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    err = {}
    for n in (32, 64):
        grid = karras_times(schedule, n)
        a, s = schedule.alpha_sigma(grid[0])
        exact = x1 * 0.5 / torch.sqrt(a ** 2 * 0.25 + s ** 2)  # each point keeps its quantile of N(0, a^2 sd^2 + s^2)
        for name in ("euler", "heun"):
            err[name, n] = (sample_ode(den, x1, grid, solver=name) - exact).abs().max().item()
    assert 1.7 < err["euler", 32] / err["euler", 64] < 2.3  # halving the step halves Euler's error
    assert 3.4 < err["heun", 32] / err["heun", 64] < 4.6  # ... and quarters Heun's
    assert err["heun", 64] < 0.1 * err["euler", 64]
    assert solvers.nfe("heun", 8) == 15 and solvers.nfe("ddim", 8) == 8


class Linear(nn.Module):
    """A deterministic nonlinear stand-in network: each example's output depends on its own input and time only."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, sample, timestep, return_dict=False):
        return (torch.tanh(self.w * sample) * (1 + timestep.view(-1, 1, 1, 1) / 1000),)


@pytest.mark.parametrize("schedule", [FlowSchedule(shift=3.0), VPSchedule(DDIMScheduler(beta_schedule="scaled_linear").alphas_cumprod)])
def test_heun_decides_the_euler_fallback_per_example_on_a_mixed_batch(schedule):
    """Examples landing on t = 0 take Euler, the others Heun, exactly as each example stepped alone."""
    den = EpsDenoiser(Linear(), schedule)
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.5, 0.3, 0.6])
    t_next = torch.tensor([0.0, 0.2, 0.0, 0.4])  # a consistency batch: some intervals end on the clean end
    with torch.no_grad():
        batch = solvers.heun_step(den, x, t, t_next)
        alone = torch.cat([solvers.heun_step(den, x[i:i + 1], t[i:i + 1], t_next[i:i + 1]) for i in range(4)])
        euler = solvers.euler_step(den, x, t, t_next)
    torch.testing.assert_close(batch, alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(batch[[0, 2]], euler[[0, 2]], atol=1e-6, rtol=1e-6)
    assert (batch[[1, 3]] - euler[[1, 3]]).abs().max() > 1e-3  # the others took the second-order step
