"""Exact cosine top-k, class prototypes and the weighted k-NN rank, in chunks (ssl4sci.knn), against brute-force
references."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import blobs
from sklearn.neighbors import NearestCentroid

from ssl4sci.knn import chunked_topk_cosine, knn_true_class_rank, l2_normalize, prototype_ranks


# ----------------------------------------------------------------------------- chunked top-k
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_topk_matches_bruteforce(chunk):
    rng = np.random.default_rng(2)
    q = l2_normalize(rng.normal(size=(23, 8)))
    k = l2_normalize(rng.normal(size=(17, 8)))
    vals, idx = chunked_topk_cosine(q, k, 5, chunk_size=chunk)
    sims = q.astype(np.float64) @ k.T.astype(np.float64)
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(vals, np.take_along_axis(sims, ref, 1), atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
def test_chunked_topk_ties_go_to_lower_index(chunk):
    # duplicated keys produce exact ties; every chunking must pick the lower index
    base = l2_normalize(np.random.default_rng(3).normal(size=(4, 5)))
    keys = np.concatenate([base, base, base])  # key i, i+4, i+8 identical
    vals, idx = chunked_topk_cosine(base, keys, 3, chunk_size=chunk)
    for i in range(4):
        assert list(idx[i]) == [i, i + 4, i + 8]
    # all keys identical: neighbours are simply 0..k-1
    same = np.ones((6, 3), dtype=np.float32)
    _, idx = chunked_topk_cosine(same[:2], same, 4, chunk_size=chunk)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3]] * 2)


# ----------------------------------------------------------------------------- prototype
def test_prototype_equals_nearest_centroid_with_renormalised_centroids():
    """Cosine-to-prototype == Euclidean NearestCentroid on unit vectors *if* centroids are unit too.

    Plain NearestCentroid on L2-normalised features uses the un-normalised class means, i.e.
    argmin ||x - m_c||^2 = argmax (2 x.m_c - ||m_c||^2), which is not the cosine rule in general;
    replacing its centroids by the re-normalised means makes it argmax x.m_c/||m_c|| exactly.
    """
    rng = np.random.default_rng(4)
    x_fit, y_fit = blobs(rng, 40, 3, 6, spread=0.9)
    x_test, y_test = blobs(rng, 40, 3, 6, spread=0.9)
    xf, xt = l2_normalize(x_fit), l2_normalize(x_test)

    ours = prototype_ranks(x_fit, y_fit, x_test, 3, 1, chunk_size=4096)[:, 0]

    nc = NearestCentroid().fit(xf, y_fit)
    nc.centroids_ = l2_normalize(nc.centroids_)  # re-normalised by hand
    np.testing.assert_array_equal(ours, nc.predict(xt))

    # brute-force cosine prototype in float64
    protos = np.stack([xf[y_fit == c].mean(0) for c in range(3)]).astype(np.float64)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    np.testing.assert_array_equal(ours, np.argmax(xt @ protos.T, axis=1))

    # the noisy task is not trivial: the plain (un-renormalised) NearestCentroid is a different
    # rule; we only check it is a sensible classifier, not equality.
    plain = NearestCentroid().fit(xf, y_fit).predict(xt)
    assert 0.4 < (plain == y_test).mean() and 0.4 < (ours == y_test).mean() < 1.0
    # on this seed the two rules disagree on a borderline point: the re-normalisation matters
    assert (plain != ours).sum() >= 1


# ----------------------------------------------------------------------------- k-NN
def test_knn_rank_handles_zero_vote_true_class_and_ties():
    # 4 classes; query equidistant setups built by hand
    x_fit = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    y_fit = np.array([2, 2, 0, 0])
    x_test = np.array([[1, 1], [1, 1], [1, 0], [1, 0]], dtype=np.float32)
    y_test = np.array([0, 2, 1, 3])
    rank, top1 = knn_true_class_rank(x_fit, y_fit, x_test, y_test, k=4, temperature=0.1, chunk_size=2)
    # query [1,1]: classes 0 and 2 tie -> 0 first
    assert list(top1[:2]) == [0, 0]
    assert list(rank[:2]) == [0, 1]
    # query [1,0]: class 2 strongly, class 0 weakly; classes 1 and 3 have no votes -> ranks 2 and 3
    assert list(top1[2:]) == [2, 2]
    assert list(rank[2:]) == [2, 3]
