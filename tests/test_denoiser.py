import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from stepdistill.denoiser import call_model, denoiser_for
from tiny_models import tiny_class_unet, tiny_dit, tiny_sd3, tiny_text_unet, tiny_unet


def _ddim_x0(sched, model_out, t, x):
    sched.set_timesteps(50)
    return sched.step(model_out, t, x).pred_original_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_x0_matches_diffusers_scheduler(prediction_type, beta_schedule):
    sched = DDIMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False)
    model = tiny_unet()
    den = denoiser_for(model, sched.config)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    for k in (0, 500, 999):
        t = den.schedule.t_of_timestep(torch.tensor(k)).float()
        with torch.no_grad():
            raw = model(x, torch.tensor([k, k])).sample
            ours = den.x0(x, t)
        torch.testing.assert_close(ours, _ddim_x0(sched, raw, k, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parameterizations_are_consistent(prediction_type):
    """x0, eps and v agree with x_t = a x0 + s eps, and the training target inverts from_output."""
    den = denoiser_for(tiny_unet(), DDIMScheduler(prediction_type=prediction_type).config)
    torch.manual_seed(1)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        x0, eps = den.predict(x, t)
    a, s = den.alpha_sigma(t, x)
    torch.testing.assert_close(a * x0 + s * eps, x, atol=1e-4, rtol=1e-4)
    raw = den.to_output(x0, eps, a, s)
    back = den.from_output(raw, x, a, s)
    torch.testing.assert_close(back.x0, x0, atol=1e-4, rtol=1e-4)


def test_flow_matches_flowmatch_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = tiny_sd3()
    den = denoiser_for(model, sched.config)
    sched.set_timesteps(4)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}
    ts = sched.timesteps[1]
    sigma, sigma_next = sched.sigmas[1], sched.sigmas[2]
    with torch.no_grad():
        v = model(hidden_states=x, timestep=ts.expand(2), **cond).sample
        expected = sched.step(v, ts, x).prev_sample
        x0, eps = den.predict(x, sigma.expand(2), cond)
    a, s = den.alpha_sigma(sigma_next.expand(2), x)
    torch.testing.assert_close(a * x0 + s * eps, expected, atol=1e-4, rtol=1e-4)


def test_classifier_free_guidance_mixes_cond_and_null():
    den = denoiser_for(tiny_class_unet(), DDIMScheduler(prediction_type="v_prediction").config,
                       {"class_labels": torch.tensor([10])})
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.5, 0.7])
    cond = {"class_labels": torch.tensor([3, 4])}
    with torch.no_grad():
        c = den.x0(x, t, cond)
        u = den.x0(x, t, {"class_labels": torch.tensor([10, 10])})
        g = den.x0(x, t, cond, guidance=3.0)
        one = den.x0(x, t, cond, guidance=1.0)
    torch.testing.assert_close(g, u + 3.0 * (c - u), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one, c)


def test_add_noise_matches_scheduler():
    sched = DDIMScheduler(beta_schedule="scaled_linear")
    den = denoiser_for(tiny_unet(), sched.config)
    x0, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    k = torch.tensor([10, 700])
    expected = sched.add_noise(x0, noise, k)
    torch.testing.assert_close(den.add_noise(x0, noise, den.schedule.t_of_timestep(k)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["unet2d", "unet2d_class", "unet2d_condition_class", "unet2d_condition_text",
                                  "dit", "sd3"])
def test_every_architecture_runs_through_the_denoiser(name):
    torch.manual_seed(0)
    builders = {
        "unet2d": (tiny_unet, (1, 8, 8), {}),
        "unet2d_class": (lambda: tiny_unet(class_cond=True), (1, 8, 8), {"class_labels": torch.tensor([1, 2])}),
        "unet2d_condition_class": (tiny_class_unet, (1, 8, 8), {"class_labels": torch.tensor([1, 2])}),
        "unet2d_condition_text": (tiny_text_unet, (4, 8, 8), {"encoder_hidden_states": torch.randn(2, 5, 16)}),
        "dit": (tiny_dit, (4, 8, 8), {"class_labels": torch.tensor([1, 2])}),
        "sd3": (tiny_sd3, (4, 8, 8), {"encoder_hidden_states": torch.randn(2, 5, 16),
                                      "pooled_projections": torch.randn(2, 8)}),
    }
    build, shape, cond = builders[name]
    model = build()
    sched = FlowMatchEulerDiscreteScheduler() if name == "sd3" else DDIMScheduler(prediction_type="epsilon")
    den = denoiser_for(model, sched.config)
    x = torch.randn(2, *shape)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        x0 = den.x0(x, t, cond)
        raw = call_model(model, x, den.schedule.model_timestep(t), cond)
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    assert raw.shape == x.shape  # DiT's learned-sigma half is dropped


def test_latent_codec_applies_the_vae_scaling_and_shift():
    from diffusers import AutoencoderKL

    from stepdistill.conditioning import LatentCodec

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        scaling_factor=0.5, shift_factor=0.1).eval()
    codec = LatentCodec(vae)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        z = (mean - 0.1) * 0.5
        torch.testing.assert_close(codec.decode(z), vae.decode(mean).sample, atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)
    lat = codec.encode(images)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = (vae.encode(images).latent_dist.sample() - 0.1) * 0.5
    torch.testing.assert_close(lat, expected)


def test_with_model_takes_a_schedule_and_refuses_a_parameterization_that_does_not_fit():
    from stepdistill.errors import StepdistillError
    from stepdistill.schedules import FlowSchedule

    teacher = denoiser_for(tiny_unet(), DDIMScheduler(prediction_type="epsilon").config)
    with pytest.raises(StepdistillError, match="a 'flow' network does not fit a VPSchedule"):
        teacher.with_model(tiny_unet(), "flow")  # a velocity student cannot keep the teacher's VP schedule
    flow = FlowSchedule(1000, shift=1.0)
    student = teacher.with_model(tiny_unet(), "flow", schedule=flow)
    assert student.schedule is flow and student.prediction_type == "flow"
    a, s = student.alpha_sigma(torch.tensor([0.25]), torch.zeros(1, 1, 8, 8))
    assert a.flatten().item() == 0.75 and s.flatten().item() == 0.25  # the student's time axis, not the teacher's


def test_features_hook_returns_the_bottleneck_and_stops_there():
    model = tiny_class_unet()
    den = denoiser_for(model, DDIMScheduler(prediction_type="v_prediction").config, {"class_labels": torch.tensor([10])})
    ups = []
    model.up_blocks[0].register_forward_hook(lambda *a: ups.append(1))
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    cond = {"class_labels": torch.tensor([1, 2])}
    feats = den.features(x, torch.tensor([0.5, 0.5]), cond)
    seen = {}
    hook = model.mid_block.register_forward_hook(lambda m, i, out: seen.setdefault("mid", out))
    with torch.no_grad():
        den.x0(x, torch.tensor([0.5, 0.5]), cond)
    hook.remove()
    assert feats.shape == seen["mid"].shape == (2, 16, 4, 4)
    torch.testing.assert_close(feats.detach(), seen["mid"])
    assert len(ups) == 1  # the features call ran no up block; the full x0 call ran them
    feats.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    sd3 = tiny_sd3()
    flow = denoiser_for(sd3, FlowMatchEulerDiscreteScheduler().config)
    tokens = flow.features(torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.6]),
                           {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)})
    assert tokens.shape[0] == 2 and tokens.ndim == 3  # a transformer block's image tokens
