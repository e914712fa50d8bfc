import pytest
import torch
from safetensors.torch import load_file

from stepdistill.errors import StepdistillError
from stepdistill.losses import Distance, LPIPSLoss, alexnet_features_path, huber_ict, ict_huber_c, l2, pseudo_huber


def test_lpips_uses_the_local_alexnet_and_is_a_distance():
    loss = LPIPSLoss()
    weights = load_file(str(alexnet_features_path()))
    torch.testing.assert_close(getattr(loss.net.net.slice1, "0").weight, weights["0.weight"])  # features[0]: conv1
    torch.testing.assert_close(getattr(loss.net.net.slice5, "10").weight, weights["10.weight"])
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    assert loss(x, x).item() < 1e-6
    assert loss(x, y).item() > loss(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)).item() > 0
    torch.testing.assert_close(loss(x, y), loss(y, x))


def test_pseudo_huber_is_zero_at_identity_symmetric_and_per_example():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    assert pseudo_huber(x, x, 0.01).abs().max().item() == 0 and pseudo_huber(x, y, 0.01).shape == (4,)
    torch.testing.assert_close(pseudo_huber(x, y, 0.01), pseudo_huber(y, x, 0.01))
    # small differences are quadratic (diff^2 / 2c), large ones linear (|diff| - c)
    torch.testing.assert_close(pseudo_huber(torch.tensor([[1e-4]]), torch.zeros(1, 1), 1.0), torch.tensor([5e-9]),
                               atol=1e-12, rtol=1e-3)
    torch.testing.assert_close(pseudo_huber(torch.tensor([[100.0]]), torch.zeros(1, 1), 1e-3),
                               torch.tensor([100.0 - 1e-3]), rtol=1e-5, atol=1e-5)
    # example 0 differs, example 1 does not: the values say so separately
    out = pseudo_huber(torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([[0.0, 0.0], [2.0, 2.0]]), 0.1)
    assert out[0] > 0.8 and out[1] == 0


def test_ict_pseudo_huber_uses_the_whole_example_and_its_constant():
    assert ict_huber_c(3072) == pytest.approx(0.0299, abs=1e-4)  # CIFAR-10: c = 0.00054 sqrt(3072)
    x = torch.randn(3, 3, 4, 4)
    y = x + 0.1
    c = ict_huber_c(48)
    n2 = ((x - y) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(huber_ict(x, y), (n2 + c * c).sqrt() - c)
    assert huber_ict(x, x).abs().max().item() == 0
    torch.testing.assert_close(l2(x, y), torch.full((3,), 0.01))


def test_distances_by_name_and_lpips_huber_is_their_sum():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    lpips = Distance("lpips")(x, y)
    both = Distance("lpips_huber")(x, y)
    assert lpips.shape == both.shape == (2,)
    torch.testing.assert_close(both, lpips + huber_ict(x, y))
    weighted = Distance("lpips_huber")(x, y, huber_weight=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(weighted, lpips + torch.tensor([0.0, 1.0]) * huber_ict(x, y))
    torch.testing.assert_close(Distance("huber", huber_c=0.01)(x, y), pseudo_huber(x, y, 0.01))
    with pytest.raises(StepdistillError, match="unknown distance 'lpipz'; choose one of l2, huber"):
        Distance("lpipz")
