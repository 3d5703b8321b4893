"""Bootstrap intervals over evaluation blocks, against a direct float64 numpy computation."""

import numpy as np
import pytest

from readme_jax.eval.spread import bootstrap_ppl, paired_difference, t_interval


def _direct_means(x, n_boot, seed):
    """Loop-by-loop float64 reference of the documented resampling (same generator and draws)."""
    idx = np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))
    return np.array([sum(float(x[j]) for j in row) / len(row) for row in idx])


def test_bootstrap_ppl_matches_direct_computation():
    rng = np.random.default_rng()
    x = rng.normal(3.0, 0.4, int(rng.integers(5, 40)))
    seed = int(rng.integers(1 << 30))
    got = bootstrap_ppl(x, n_boot=300, seed=seed)
    means = _direct_means(x, 300, seed)
    assert got["ppl"] == pytest.approx(np.exp(np.mean(x)), rel=1e-12)
    assert got["lo"] == pytest.approx(np.exp(np.percentile(means, 2.5)), rel=1e-12)
    assert got["hi"] == pytest.approx(np.exp(np.percentile(means, 97.5)), rel=1e-12)
    assert got["lo"] <= got["ppl"] <= got["hi"]


def test_bootstrap_interval_width_is_the_standard_error_for_many_blocks():
    rng = np.random.default_rng()
    x = rng.normal(2.0, 0.5, 400)
    got = bootstrap_ppl(x, n_boot=2000, seed=int(rng.integers(1 << 30)))
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert np.log(got["hi"]) - np.log(got["lo"]) == pytest.approx(2 * half, rel=0.15)


def test_paired_difference_uses_the_same_resample_for_both():
    rng = np.random.default_rng()
    b = rng.normal(3.0, 1.0, 30)  # blocks differ a lot; the paired difference is small and steady
    a = b - 0.2 + rng.normal(0, 0.02, 30)
    seed = int(rng.integers(1 << 30))
    got = paired_difference(a, b, n_boot=500, seed=seed)
    means = _direct_means(a - b, 500, seed)
    assert got["mean_diff"] == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
    assert got["lo"] == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
    assert got["hi"] == pytest.approx(np.percentile(means, 97.5), abs=1e-12)
    assert got["significant"] and got["hi"] < 0  # unpaired, the spread of b would swamp 0.2
    assert not paired_difference(b, a, n_boot=500, seed=seed)["hi"] < 0


def test_paired_difference_not_significant_when_differences_cancel():
    rng = np.random.default_rng()
    b = rng.normal(3.0, 1.0, 40)
    e = rng.normal(0, 0.3, 20)
    a = b + np.concatenate([e, -e])  # mean difference exactly 0, spread around it
    got = paired_difference(a, b, n_boot=1000, seed=int(rng.integers(1 << 30)))
    assert abs(got["mean_diff"]) < 1e-12 and got["lo"] < 0 < got["hi"] and not got["significant"]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same blocks"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ppl([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ppl([1.0, np.nan])


def test_t_interval_by_hand():
    # [1, 2, 3]: mean 2, sd 1; Student t with 2 degrees of freedom has the closed-form quantile
    # (2p - 1) / sqrt(2 p (1 - p)), p = 0.975 (= 4.3027); half-width t / sqrt(3)
    got = t_interval([1.0, 2.0, None, 3.0])
    p = 0.975
    h = (2 * p - 1) / np.sqrt(2 * p * (1 - p)) / np.sqrt(3)
    assert got["n"] == 3 and got["mean"] == 2.0
    np.testing.assert_allclose([got["ci95_low"], got["ci95_high"]], [2 - h, 2 + h], rtol=1e-12)
    assert t_interval([5.0]) == {"mean": 5.0, "ci95_low": 5.0, "ci95_high": 5.0, "n": 1}
