import numpy as np
import pytest
import torch

from xrayforge.utils.neighbours import nearest_neighbours, pixel_vectors, realism


def test_nearest_neighbours_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(37, 5, generator=g), torch.randn(53, 5, generator=g)
    d, i = nearest_neighbours(q, r)  # ops.knn, whose chunking tests/test_ops_knn.py checks
    full = torch.cdist(q.double(), r.double())
    # ops.knn's distances are exact (float64 differences); rounded to float32: one unit at most
    torch.testing.assert_close(d, full.min(1).values.float(), rtol=1.2e-7, atol=0)
    assert torch.equal(i, full.argmin(1))
    d2, i2 = nearest_neighbours(r, r, exclude_self=True)
    full = torch.cdist(r.double(), r.double()).fill_diagonal_(float("inf"))
    assert torch.equal(i2, full.argmin(1)) and (i2 != torch.arange(53)).all()


def test_pixel_vectors_area_resize_and_grey():
    x = torch.rand(3, 3, 64, 64)
    v = pixel_vectors(x, size=32)
    assert v.shape == (3, 32 * 32)
    want = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1)
    torch.testing.assert_close(v, want)
    small = torch.rand(5, 16, 16)  # smaller than 32: every pixel replicated, so sets of any sizes compare
    torch.testing.assert_close(pixel_vectors(small), small.repeat_interleave(2, -1).repeat_interleave(2, -2).flatten(1))


def test_realism_is_one_for_the_same_distribution_and_large_for_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(40, 64, generator=g)

    def draw(n):  # a mixture: every image near one of 40 "patients"
        return centres[torch.randint(0, 40, (n,), generator=g)] + 0.05 * torch.randn(n, 64, generator=g)

    same = realism(draw(400), draw(400))
    assert 0.8 < same["realism"] < 1.25 and 0.8 < same["diversity"] < 1.25
    noise = realism(torch.rand(400, 64, generator=g) * 2, draw(400))
    assert noise["realism"] > 5
    collapsed = realism(centres[:1] + 0.001 * torch.randn(400, 64, generator=g), draw(400))
    assert collapsed["diversity"] < 0.1
    copies = realism(centres[:20].clone(), centres)
    assert copies["realism"] == 0.0


def test_realism_needs_two_images_each():
    with pytest.raises(ValueError, match="at least 2"):
        realism(torch.rand(1, 4), torch.rand(5, 4))


def test_realism_medians_of_an_even_count_are_the_middle_of_the_two():
    real = torch.tensor([[0.0, 0.0], [10.0, 0.0]])  # each 10 from the other
    fake = torch.tensor([[0.0, 1.0], [0.0, 3.0]])  # 1 and 3 from the nearest real, 2 from each other
    r = realism(fake, real)
    assert r["fake_to_real"] == 2.0 and r["real_to_real"] == 10.0  # exact distances of exact points
    assert r["realism"] == 0.2 and r["diversity"] == 0.2


def _brute_other_group(x, groups):
    """Each row's nearest row of another group, with the whole float64 distance matrix (numpy)."""
    x = x.double().numpy()
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
    d[np.asarray(groups)[:, None] == np.asarray(groups)[None, :]] = np.inf
    return d.min(1), d.argmin(1)


def test_nearest_other_group_equals_brute_force_with_the_group_mask():
    """Uneven groups (1 to 23 rows, one spanning several chunks), both contiguous and interleaved,
    chunks of 5 queries × 7 references whose boundaries fall inside groups: each row's neighbour
    is the nearest row of another group, as the whole masked distance matrix says."""
    from xrayforge.utils.neighbours import nearest_other_group
    rng = np.random.default_rng(0)
    sizes = [1, 23, 2, 7, 1, 3, 11, 4, 1, 9]
    contiguous = np.repeat(np.arange(len(sizes)), sizes)
    for groups in (contiguous, rng.permutation(contiguous), np.array([f"p{g}" for g in contiguous])):
        x = torch.from_numpy(rng.standard_normal((len(groups), 5))).float()
        want_d, want_i = _brute_other_group(x, groups)
        for chunks in ((5, 7), (7, 5), (1, 3), (2048, 16384)):
            d, i = nearest_other_group(x, groups, *chunks)
            assert d.dtype == torch.float32 and i.dtype == torch.int64
            np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-6)
            assert (i.numpy() == want_i).all() and (np.asarray(groups)[i.numpy()] != np.asarray(groups)).all()
        d, i = nearest_neighbours(x, x, groups=list(groups))  # the same through nearest_neighbours
        np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-6)
        assert (i.numpy() == want_i).all()


def test_nearest_other_group_skips_close_group_mates_and_one_group_is_an_error():
    from xrayforge.utils.neighbours import nearest_other_group
    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 8, generator=g, dtype=torch.float64)
    x = torch.cat([base, base + 1e-4 * torch.randn(30, 8, generator=g, dtype=torch.float64)])  # a rescan each
    pid = list(range(30)) * 2
    d_self = nearest_neighbours(x, x, exclude_self=True)[0]
    d_other, i_other = nearest_neighbours(x, x, groups=pid)
    assert d_self.max() < 1e-3 and d_other.min() > 0.1  # the rescan is the nearest other row, never another group's
    want_d, want_i = _brute_other_group(x, pid)
    np.testing.assert_allclose(d_other.numpy(), want_d, rtol=1e-6)
    assert (i_other.numpy() == want_i).all()
    # one row a group: the same as excluding each row itself
    d1, i1 = nearest_neighbours(base, base, groups=range(30))
    d0, i0 = nearest_neighbours(base, base, exclude_self=True)
    torch.testing.assert_close(d1, d0)
    assert torch.equal(i1, i0)
    with pytest.raises(ValueError, match="one group"):
        nearest_other_group(x, ["p"] * 60)
    with pytest.raises(ValueError, match="group ids"):
        nearest_other_group(x, pid[:-1])
    with pytest.raises(ValueError, match="same set"):
        nearest_neighbours(x[:5], x, groups=pid)


def test_nearest_other_group_gives_an_identical_row_of_another_group_exactly_zero():
    """The float64 expansion put two identical float32 rows of grey levels about 1.5e-6 apart."""
    from xrayforge.utils.neighbours import nearest_other_group
    g = torch.Generator().manual_seed(3)
    x = torch.rand(12, 1024, generator=g)
    x[7] = x[2]  # another patient's identical image
    d, i = nearest_other_group(x, [0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6])
    assert d[2] == 0 and d[7] == 0 and i[2] == 7 and i[7] == 2
