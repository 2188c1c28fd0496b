import pytest
import torch

from xrayforge.utils.neighbours import nearest_neighbours, pixel_vectors, realism


def test_nearest_neighbours_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(37, 5, generator=g), torch.randn(53, 5, generator=g)
    d, i = nearest_neighbours(q, r)  # ops.knn, whose chunking tests/test_ops_knn.py checks
    full = torch.cdist(q.double(), r.double())
    torch.testing.assert_close(d, full.min(1).values.float(), rtol=1e-5, atol=1e-6)
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
    assert r["fake_to_real"] == pytest.approx(2.0) and r["real_to_real"] == pytest.approx(10.0)
    assert r["realism"] == pytest.approx(0.2) and r["diversity"] == pytest.approx(0.2)
