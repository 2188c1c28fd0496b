"""The real images D sees during training: range, pyramid level, fade-in blend, mirroring, and the
images of each epoch (the training split, each image once)."""
import numpy as np
import pytest
import torch

import xrayforge.train.trainer as trainer_module
from xrayforge.data.archive import Archive
from xrayforge.data.prepare import prepare
from xrayforge.train.trainer import TrainConfig, Trainer

CFG = dict(fade_images=32, stable_images=32, tick_images=32, latent_dim=8, fmap_base=32, fmap_max=8,
           batch={4: 4, 8: 4}, checkpoint_ticks=100, keep_checkpoints=1, realism_images=0, device="cpu")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "phantom8"
    prepare("phantom:13", path, resolution=8, workers=1, progress=False)  # rows 0, 5, 10: the test split
    return path


def _record_reals(trainer, monkeypatch):
    seen = []

    class Step:  # stands in for PGGANStep: keeps what the step is given
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, real, level, alpha, gen, ema_beta=None):
            seen.append((trainer.images_seen, level, float(alpha), real.detach().clone()))
            return {"d_loss": 0.0, "g_loss": 0.0}

    monkeypatch.setattr(trainer_module, "PGGANStep", Step)
    trainer.step = Step()  # the first phase's, made before the patch
    monkeypatch.setattr(trainer, "_write_tick", lambda record, final=False: None)
    trainer.train()
    return seen


def test_the_fade_in_blend_of_a_real_batch_by_hand(archive, tmp_path):
    t = Trainer(TrainConfig(str(archive), str(tmp_path / "run"), **CFG), progress=False)
    try:
        u = torch.tensor([[0, 255, 51, 51], [255, 255, 51, 51], [0, 0, 102, 204], [0, 0, 0, 0]],
                         dtype=torch.uint8)[None]
        x = u.float() / 255 * 2 - 1
        # 2×2 means in [-1, 1]: 0.5 (three 255s, one 0), 0.2*2-1, -1, 0.3*2-1 (102+204 over 4 = 76.5)
        low = torch.tensor([[0.5, 0.4 - 1], [-1.0, 0.6 - 1]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
        torch.testing.assert_close(t._real(u, 1.0, mirror=False)[0, 0], x[0])
        torch.testing.assert_close(t._real(u, 0.0, mirror=False)[0, 0], low)
        torch.testing.assert_close(t._real(u, 0.25, mirror=False)[0, 0], 0.75 * low + 0.25 * x[0])
        assert t._real(u, 1.0, mirror=False).min() == -1 and t._real(u, 1.0, mirror=False).max() == 1
        t.max_value = 65535  # a 16-bit archive's integers
        torch.testing.assert_close(t._real(torch.tensor([[[0, 65535], [32768, 13107]]], dtype=torch.uint16), 1.0,
                                           mirror=False)[0, 0], torch.tensor([[-1.0, 1.0], [1 / 65535, -0.6]]))
    finally:
        t.close()


@pytest.mark.parametrize("mirror", [False, True])
def test_training_sees_each_training_image_once_per_epoch_at_its_level(archive, tmp_path, monkeypatch, mirror):
    arc = Archive(archive)
    t = Trainer(TrainConfig(str(archive), str(tmp_path / "run"), mirror=mirror, **CFG), progress=False)
    try:
        seen = _record_reals(t, monkeypatch)
    finally:
        t.close()
    train = arc.training_positions()
    assert train.tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12]
    assert [s for s, *_ in seen] == list(range(0, 96, 4))
    order = np.concatenate([t.stream.positions(s, 4) for s, *_ in seen])
    for epoch in range(len(order) // len(train)):  # every training image once an epoch, no test image ever
        assert sorted(order[epoch * 10:(epoch + 1) * 10]) == train.tolist()
    flipped = 0
    for (start, level, alpha, real), i in zip(seen, range(0, len(order), 4)):
        res = 4 * 2 ** level
        assert real.shape == (4, 1, res, res)
        x = torch.from_numpy(arc.images(np.sort(order[i:i + 4]), res)).double() / 255 * 2 - 1  # the stored level
        if alpha < 1:  # lerp(nearest-upsampled 2×2 means, image, α)
            low = x.reshape(4, res // 2, 2, res // 2, 2).mean((2, 4)).repeat_interleave(2, 1).repeat_interleave(2, 2)
            x = low + alpha * (x - low)
        for got, want in zip(real[:, 0].double(), x):
            if mirror and not torch.allclose(got, want, atol=1e-6):
                torch.testing.assert_close(got, want.flip(-1), atol=1e-6, rtol=0)  # the width axis only
                flipped += 1
            else:
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (0 < flipped < len(order)) if mirror else flipped == 0
