import torch
from safetensors.torch import load_file

from stepdistill.losses import LPIPSLoss, alexnet_features_path


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
