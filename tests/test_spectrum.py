"""Tests for ssl4sci.spectrum: effective rank (RankMe) and principal-component variance shares on hand-made clouds."""
import math

import numpy as np
import pytest
import torch

from ssl4sci.spectrum import effective_rank, spectrum_summary, variance_shares


def _low_rank(n: int, dim: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, dim))


def test_isotropic_gaussian_has_nearly_full_rank():
    x = np.random.default_rng(0).normal(size=(20000, 32))
    assert effective_rank(x) == pytest.approx(32, rel=0.01)
    assert variance_shares(x, 1)[0] == pytest.approx(1 / 32, rel=0.1)


def test_rank_one_data_has_rank_one_and_all_variance_in_pc1():
    x = _low_rank(500, 64, 1) + 3.0
    assert effective_rank(x) == pytest.approx(1.0, abs=1e-6)
    assert variance_shares(x, 2) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("rank", [2, 5, 12])
def test_rank_r_data_has_effective_rank_at_most_r(rank):
    x = _low_rank(400, 48, rank, seed=rank)
    assert 1.0 < effective_rank(x) <= rank + 1e-6
    assert variance_shares(x, rank)[-1] == pytest.approx(1.0)


def test_equal_variance_in_r_orthogonal_directions_gives_exactly_r():
    # +-1 along each of r axes (a centred cube's vertices): r equal singular values, entropy ln r
    corners = np.array(np.meshgrid(*[[-1.0, 1.0]] * 3)).reshape(3, -1).T
    x = np.zeros((len(corners), 10))
    x[:, [0, 4, 7]] = corners
    assert effective_rank(x) == pytest.approx(3.0, rel=1e-9)
    assert variance_shares(x, 3) == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_invariant_to_scale_and_constant_offset_because_features_are_centred():
    x = _low_rank(300, 24, 6) + 0.1 * np.random.default_rng(1).normal(size=(300, 24))
    reference = effective_rank(x), variance_shares(x, 2)
    for transformed in (1e3 * x, 1e-3 * x, x + 1e3, x - np.linspace(-50, 50, 24)):
        assert effective_rank(transformed) == pytest.approx(reference[0], rel=1e-6)
        assert variance_shares(transformed, 2) == pytest.approx(reference[1], rel=1e-6)


def test_identical_rows_have_rank_zero_and_no_variance_shares():
    summary = spectrum_summary(np.full((10, 8), 0.1, dtype=np.float32))
    assert summary["effective_rank"] == 0.0 and summary["pc1_share"] is None and summary["pc2_share"] is None


def test_summary_of_float32_tensor_matches_float64_array():
    x = _low_rank(256, 16, 4).astype(np.float32)
    summary = spectrum_summary(torch.from_numpy(x))
    assert summary["effective_rank"] == pytest.approx(effective_rank(x.astype(np.float64)), rel=1e-5)
    assert summary["embed_dim"] == 16 and summary["n"] == 256
    assert summary["effective_rank_ratio"] == pytest.approx(summary["effective_rank"] / 16)
    assert summary["pc1_share"] <= summary["pc2_share"] <= 1.0


def test_large_matrix_is_processed_in_blocks_with_the_same_result():
    x = np.random.default_rng(2).normal(size=(70000, 6)).astype(np.float32)  # more rows than one block
    x[:, 0] *= 5.0
    singular = np.linalg.svd(x - x.astype(np.float64).mean(axis=0), compute_uv=False)
    p = singular / singular.sum()
    assert effective_rank(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)


@pytest.mark.parametrize("bad", [np.zeros((0, 4)), np.zeros(5), np.zeros((3, 0))])
def test_bad_shapes_fail_with_one_line(bad):
    with pytest.raises(ValueError, match="expected a non-empty"):
        effective_rank(bad)


def test_non_finite_features_fail():
    x = np.ones((4, 3))
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        effective_rank(x)
