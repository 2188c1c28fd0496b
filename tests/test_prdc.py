"""Precision / recall / density / coverage against a brute-force implementation of their
definitions (and the `prdc` package's output where it is installed)."""
import numpy as np
import pytest
import torch

from xrayforge.errors import UserError
from xrayforge.fid.prdc import ball_counts, density_coverage, prdc, precision_recall


def _dist(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _radii(x, k):
    d = _dist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


def brute(real, fake, k_pr=3, k_dc=5):
    """The definitions, written out with the whole distance matrix."""
    d_fr = _dist(fake, real)          # (fake, real)
    rr, rf = _radii(real, k_pr), _radii(fake, k_pr)
    precision = np.mean([(d_fr[i] <= rr).any() for i in range(len(fake))])
    recall = np.mean([(d_fr[:, j] <= rf).any() for j in range(len(real))])
    rr5 = _radii(real, k_dc)
    density = sum((d_fr[i] <= rr5).sum() for i in range(len(fake))) / (k_dc * len(fake))
    coverage = np.mean([d_fr[:, j].min() <= rr5[j] for j in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.7, 1.0), (0.0, 0.3), (2.0, 2.0)])
def test_equal_to_the_definitions(shift, scale):
    rng = np.random.default_rng(int(10 * shift + 7 * scale))
    real = rng.standard_normal((120, 8))
    fake = rng.standard_normal((90, 8)) * scale + shift
    got, want = prdc(real, fake), brute(real, fake)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_what_each_number_says():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 4))
    same = prdc(real, rng.standard_normal((300, 4)))
    assert same["precision"] > 0.7 and same["recall"] > 0.7 and 0.7 < same["density"] < 1.3 and same["coverage"] > 0.8
    collapsed = prdc(real, rng.standard_normal((300, 4)) * 0.2)  # realistic but not diverse
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.3 and collapsed["coverage"] < 0.5
    off = prdc(real, rng.standard_normal((300, 4)) + 4.0)  # diverse but unrealistic
    assert off["precision"] < 0.1 and off["density"] < 0.1


def test_torch_and_numpy_inputs_agree_and_chunking_changes_nothing():
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((70, 5)), rng.standard_normal((50, 5))
    assert precision_recall(torch.from_numpy(real).float(), torch.from_numpy(fake).float()) == \
        pytest.approx(precision_recall(real.astype(np.float32), fake.astype(np.float32)))
    r = torch.from_numpy(real)
    radius = torch.full((70,), 1.5, dtype=torch.float64)
    torch.testing.assert_close(ball_counts(torch.from_numpy(fake), r, radius, chunk_p=7, chunk_c=9),
                               ball_counts(torch.from_numpy(fake), r, radius))


def test_the_prdc_package_where_it_installs():
    package = pytest.importorskip("prdc")
    rng = np.random.default_rng(2)
    real, fake = rng.standard_normal((100, 6)), rng.standard_normal((80, 6)) + 0.3
    theirs = package.compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    ours = density_coverage(real, fake, k=5) | precision_recall(real, fake, k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key


def test_bad_input():
    with pytest.raises(UserError, match="different feature spaces"):
        prdc(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(UserError, match="more than 5"):
        density_coverage(np.random.rand(5, 2), np.random.rand(9, 2))
    with pytest.raises(UserError, match="NaN"):
        prdc(np.full((10, 2), np.nan), np.zeros((10, 2)))
    with pytest.raises(UserError, match=r"\(N, D\)"):
        prdc(np.zeros(10), np.zeros(10))
    # a k past the search's limit, or not an integer, is said of k (it was "knn: k must be in 1 .. 16")
    for k in (17, 0, 2.5, True):
        with pytest.raises(UserError, match=f"^k must be an integer in 1 .. 16 .*got {k!r}"):
            precision_recall(np.random.rand(40, 2), np.random.rand(40, 2), k=k)
    assert precision_recall(np.random.rand(9, 2), np.random.rand(9, 2), k=np.int64(3))["k"] == 3


@pytest.mark.parametrize("d", [8, 64, 2048])
def test_generated_copies_of_real_points_are_counted_by_the_convention_not_by_rounding(d):
    # a memorising generator (or the real set against itself) puts generated points exactly on
    # the real balls' boundaries (a real point's k-th neighbour is one of them): distance <= radius
    # must decide, not whether two computations of one distance round alike
    rng = np.random.default_rng(d)
    real = np.maximum(rng.standard_normal((150, d)), 0).astype(np.float32)
    fake = np.concatenate([real[:60], np.maximum(rng.standard_normal((40, d)), 0).astype(np.float32)])
    assert brute(real, real)["density"] == pytest.approx(1.2)  # each ball: its centre and 5 neighbours, k = 5
    for f in (real, fake):
        got, want = prdc(real, f), brute(real.astype(np.float64), f.astype(np.float64))
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_pair_distances_gathers_rows_a_chunk_at_a_time():
    """ball_counts re-measures the pairs near a radius; a block of identical features (blank images, a
    collapsed generator) makes every pair in it near: 2.25M pairs here, whose gathered copies took
    2.3 GB at 64 dimensions (131 GB at 2048). Gathered per chunk, memory stays flat."""
    import subprocess
    import sys
    from xrayforge.fid.prdc import pair_distances
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(40, 8, generator=g)
    i, j = torch.randint(0, 50, (100,), generator=g), torch.randint(0, 40, (100,), generator=g)
    torch.testing.assert_close(pair_distances(a, b, i, j, chunk=7), (a[i].double() - b[j].double()).norm(dim=1))
    code = ("import resource, torch\n"
            "from xrayforge.fid.prdc import ball_counts, radii\n"
            "x = torch.cat([torch.ones(1500, 64), torch.randn(300, 64)]).double()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "counts = ball_counts(x, x, radii(x, 5))\n"
            "assert counts[:1500].ge(1500).all(), counts[:3]  # each identical point is in all their balls\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e6)\n")
    grew = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grew < 0.8, f"ball_counts grew the process by {grew:.2f} GB"
