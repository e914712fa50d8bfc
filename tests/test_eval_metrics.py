"""The metric math: Frechet distance against closed forms, KID sign and scale, precision/recall, statistics files."""

import numpy as np
import pytest
import torch
from scipy import linalg

from stepdistill.errors import StepdistillError
from stepdistill.eval.fid import Statistics, compute_metrics, frechet_distance


def gaussian(mu, sigma, key="x") -> Statistics:
    return Statistics(np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64), None, key, "test")


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    """Commuting covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    fid = frechet_distance(gaussian(mu1, np.diag(s1)), gaussian(mu2, np.diag(s2)))
    assert fid == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_general_gaussians_matches_the_matrix_square_root_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = random_spd(6, rng), random_spd(6, rng)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(gaussian(mu1, s1), gaussian(mu2, s2)) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(gaussian(mu1, s1), gaussian(mu1, s1)) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_samples_approaches_the_closed_form_and_a_set_against_itself_is_zero():
    rng = np.random.default_rng(1)
    d, n = 4, 20000
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    mu2 = np.full(d, 0.5)
    x = torch.from_numpy(rng.multivariate_normal(np.zeros(d), s1, n).astype(np.float32))
    y = torch.from_numpy(rng.multivariate_normal(mu2, s2, n).astype(np.float32))
    a, b = Statistics.from_features(x, "k", "x"), Statistics.from_features(y, "k", "y")
    exact = np.sum(mu2 ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert compute_metrics(a, b)["fid"] == pytest.approx(exact, rel=0.05)
    assert abs(compute_metrics(a, a)["fid"]) < 1e-6


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift_at_the_mmd_scale():
    rng = np.random.default_rng(2)
    d, n = 8, 300
    x = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    same = compute_metrics(Statistics.from_features(x, "k", "x"), Statistics.from_features(y, "k", "y"), ["kid"],
                           kid_subsets=20, kid_subset_size=200)
    assert abs(same["kid_mean"]) < 3 * same["kid_std"] + 1e-3

    def kid(shift):
        s = Statistics.from_features(y + shift, "k", "y")
        return compute_metrics(Statistics.from_features(x, "k", "x"), s, ["kid"], kid_subsets=1, kid_subset_size=n)

    small, large = kid(0.5)["kid_mean"], kid(2.0)["kid_mean"]
    assert 0 < small < large

    # scale: with one subset holding every sample, KID is the unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3
    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    xs, ys = x.double().numpy(), (y + 2.0).double().numpy()
    kxx, kyy, kxy = k(xs, xs), k(ys, ys), k(xs, ys)
    mmd2 = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
    assert large == pytest.approx(mmd2, rel=1e-4)


def test_precision_and_recall_of_a_set_against_itself_are_one_and_fall_for_a_far_set():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((64, 5)).astype(np.float32))
    a = Statistics.from_features(x, "k", "x")
    same = compute_metrics(a, a, ["prc"])
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = compute_metrics(Statistics.from_features(x + 50, "k", "far"), a, ["prc"])
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_statistics_file_round_trip_and_clear_errors(tmp_path):
    x = torch.randn(10, 3)
    a = Statistics.from_features(x, "digits:features:abc", "mine")
    path = a.save(tmp_path / "s.safetensors")
    b = Statistics.load(path)
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma) and torch.equal(a.features, b.features)
    assert (b.extractor, b.source, b.num) == ("digits:features:abc", "mine", 10)
    assert compute_metrics(a, b)["fid"] == pytest.approx(0.0, abs=1e-9)

    other = Statistics.from_features(torch.randn(10, 3), "inception-fid-torchscript:2048:def", "theirs")
    with pytest.raises(StepdistillError, match="mismatched statistics: mine was embedded with digits"):
        compute_metrics(a, other)
    no_features = Statistics(a.mu, a.sigma, None, a.extractor, "stats-only")
    with pytest.raises(StepdistillError, match="stats-only holds statistics only; KID"):
        compute_metrics(no_features, a, ["fid", "kid"])
    with pytest.raises(StepdistillError, match="does not exist"):
        Statistics.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StepdistillError, match="cannot read statistics file .*bad.safetensors"):
        Statistics.load(tmp_path / "bad.safetensors")
