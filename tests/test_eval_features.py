"""Feature extractors registered with torch-fidelity: the digits classifier, the offline FID Inception
(TorchScript), torch-fidelity's Inception from safetensors; our numbers against torch-fidelity's own."""

import json

import numpy as np
import pytest
import torch
import torch_fidelity
from eval_helpers import colour_folder, digits_folder, inception_asset
from scipy import linalg
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.utils import create_feature_extractor

from stepdistill.cli import main
from stepdistill.errors import StepdistillError
from stepdistill.eval import features
from stepdistill.eval.features import DIGITS_EXTRACTOR, load_digits_classifier, resolve_inception
from stepdistill.eval.fid import Statistics
from stepdistill.eval.quality import DigitsFID
from stepdistill.eval.sources import to_uint8_nchw
from stepdistill.training.data import digits_images


@pytest.fixture(autouse=True)
def stats_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "eval-cache"))


def previous_digits_fid(images, reference):
    """The quickstart's FID before torch-fidelity: classifier features, float64 moments, scipy's sqrtm."""
    clf = load_digits_classifier()

    def stats(x):
        with torch.no_grad():
            f = clf.features(x.clamp(-1, 1)).numpy().astype(np.float64)
        return f.mean(0), np.cov(f, rowvar=False)

    (m1, s1), (m2, s2) = stats(images), stats(reference)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_digits_extractor_path_equals_the_previous_direct_computation():
    real, _ = digits_images()
    on_grid = to_uint8_nchw(real).float() / 127.5 - 1  # images as PNG files hold them: nothing lost to rounding
    samples = on_grid[:400] + 0.2 * torch.randn(on_grid[:400].shape, generator=torch.Generator().manual_seed(0))
    samples = to_uint8_nchw(samples).float() / 127.5 - 1

    extractor = create_feature_extractor(DIGITS_EXTRACTOR, ["features"], cuda=False)  # torch-fidelity builds it
    rgb = to_uint8_nchw(samples).expand(-1, 3, -1, -1)
    with torch.no_grad():
        ours = extractor(rgb)[0]
        direct = load_digits_classifier().features(samples)
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-5)

    fid = DigitsFID()
    assert fid(samples) == pytest.approx(previous_digits_fid(samples, on_grid), rel=1e-4)
    # off the uint8 grid the new path rounds as a PNG would; the number barely moves
    assert fid(real[:400]) == pytest.approx(previous_digits_fid(real[:400], real), rel=0.02)


def test_digits_extractor_takes_gray_or_rgb_and_resizes():
    extractor = create_feature_extractor(DIGITS_EXTRACTOR, ["features", "logits"], cuda=False)
    real, labels = digits_images()
    gray = to_uint8_nchw(real[:50])
    with torch.no_grad():
        f_gray, logits = extractor(gray)
        f_rgb, _ = extractor(gray.expand(-1, 3, -1, -1))
        f_big, _ = extractor(torch.nn.functional.interpolate(gray.float(), size=(32, 32), mode="nearest").byte())
    assert torch.equal(f_gray, f_rgb)
    assert (logits.argmax(1) == labels[:50]).float().mean() > 0.9
    assert torch.nn.functional.cosine_similarity(f_big, f_gray).mean() > 0.9
    with pytest.raises(ValueError, match="uint8"):
        extractor(real[:2])


def test_fid_kid_prc_equal_torch_fidelitys_own_on_the_same_folders(tmp_path):
    a = digits_folder(tmp_path / "a", range(0, 120), noise=0.3)
    b = digits_folder(tmp_path / "b", range(300, 400))
    out = tmp_path / "ours.json"
    assert main(["fid", str(a), str(b), "--extractor", "digits", "--metrics", "fid,kid,prc", "--kid-subset-size", "50",
                 "--kid-subsets", "20", "--json", str(out)]) == 0
    ours = json.loads(out.read_text())
    theirs = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), cuda=False, fid=True, kid=True, prc=True,
                                              feature_extractor=DIGITS_EXTRACTOR, kid_subset_size=50, kid_subsets=20,
                                              cache=False, verbose=False, save_cpu_ram=True)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])
    assert ours["fid"] > 1.0 and ours["extractor"] == DIGITS_EXTRACTOR


def test_offline_inception_statistics_equal_torch_fidelitys_own(tmp_path, monkeypatch):
    """The TorchScript Inception on a handful of images: our cached statistics are exactly those torch-fidelity's
    own folder pipeline computes with the same registered extractor (FID itself is then the same function)."""
    from torch_fidelity.metric_fid import fid_input_id_to_statistics

    weights = inception_asset()
    monkeypatch.setenv("STEPDISTILL_ASSETS", str(weights.parent))
    a = colour_folder(tmp_path / "a", 4, seed=0)
    assert main(["fid", str(a), "--save-stats", str(tmp_path / "a.safetensors")]) == 0
    ours = Statistics.load(tmp_path / "a.safetensors")
    assert ours.extractor.startswith(features.INCEPTION_TORCHSCRIPT) and ours.features.shape == (4, 2048)
    fe = create_feature_extractor(features.INCEPTION_TORCHSCRIPT, ["2048"], cuda=False,
                                  feature_extractor_weights_path=str(weights))
    theirs = fid_input_id_to_statistics(1, fe, "2048", input1=str(a), cuda=False, verbose=False, save_cpu_ram=True)
    np.testing.assert_allclose(ours.mu, theirs["mu"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.sigma, theirs["sigma"], rtol=1e-6, atol=1e-9)
    assert ours.features.std(0).mean() > 1e-3  # the images are told apart


@pytest.mark.slow
def test_offline_inception_fid_equals_torch_fidelitys_and_a_set_against_itself_is_zero(tmp_path, monkeypatch):
    """Full FIDs with 2048-d features (each eigen-decomposition takes ~10-40 s on a CPU)."""
    weights = inception_asset()
    monkeypatch.setenv("STEPDISTILL_ASSETS", str(weights.parent))
    a, b = colour_folder(tmp_path / "a", 4, seed=0), colour_folder(tmp_path / "b", 4, seed=1)
    assert main(["fid", str(a), str(b), "--json", str(tmp_path / "ab.json")]) == 0
    assert main(["fid", str(a), str(a), "--json", str(tmp_path / "aa.json")]) == 0
    ours = json.loads((tmp_path / "ab.json").read_text())
    theirs = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), cuda=False, fid=True,
                                              feature_extractor=features.INCEPTION_TORCHSCRIPT, save_cpu_ram=True,
                                              feature_extractor_weights_path=str(weights), cache=False, verbose=False)
    assert ours["extractor"] == features.INCEPTION_TORCHSCRIPT
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["fid"] > 1.0
    assert abs(json.loads((tmp_path / "aa.json").read_text())["fid"]) < 1e-2 * ours["fid"]


def test_torch_fidelity_inception_from_safetensors_matches_its_own_loading(tmp_path):
    """Same (random) weights: read from .safetensors by us, unpickled from .pth by torch-fidelity itself."""
    from safetensors.torch import save_file

    with features._inception_state_from(None), pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        state = {k: v.clone() for k, v in FeatureExtractorInceptionV3("x", ["2048"]).state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    name, path = resolve_inception(tmp_path / "w.safetensors")
    ours = create_feature_extractor(name, ["2048"], cuda=False, feature_extractor_weights_path=path)
    theirs = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                      feature_extractor_weights_path=str(tmp_path / "w.pth"))
    x = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(ours(x)[0], theirs(x)[0])


def test_missing_inception_weights_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STEPDISTILL_ASSETS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # nothing cached from an earlier download
    with pytest.raises(StepdistillError, match="needs the Inception weights") as e:
        resolve_inception()
    assert "inception-2015-12-05-fid.pt" in str(e.value) and "STEPDISTILL_ASSETS" in str(e.value)
    assert "--inception-weights" in str(e.value)

    a = colour_folder(tmp_path / "a", 2, seed=0)
    assert main(["fid", str(a), str(a)]) == 2
    assert "inception-2015-12-05-fid.pt" in capsys.readouterr().err

    monkeypatch.setenv("STEPDISTILL_ASSETS", str(tmp_path / "empty"))
    with pytest.raises(StepdistillError, match=f"{tmp_path / 'empty' / 'inception-2015-12-05-fid.pt'} does not exist"):
        resolve_inception()
    with pytest.raises(StepdistillError, match="missing.pt does not exist"):
        resolve_inception(tmp_path / "missing.pt")
    (tmp_path / "w.pth").write_bytes(b"pickle")
    with pytest.raises(StepdistillError, match="never pickles"):
        resolve_inception(tmp_path / "w.pth")
