"""The training data pipeline: the archive's box pyramid and rows, the batch stream, the prefetch
thread and the phantom's findings."""
import csv
import shutil
import threading

import numpy as np
import pytest
import torch

from xrayforge.data.archive import Archive, box_pyramid, quantize
from xrayforge.data.loader import BatchStream, Prefetcher
from xrayforge.data.phantom import PHANTOM_FINDINGS, render
from xrayforge.data.prepare import prepare
from xrayforge.errors import UserError


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "phantom8"
    prepare("phantom:13", path, resolution=8, workers=1, progress=False)  # rows 0, 5, 10 are the test split
    return path


def test_box_pyramid_quantizes_each_level_from_the_float_average():
    img = np.zeros((8, 8))
    img[:2, :2] = np.array([[0.45, 0.45], [0.45, 1.6]]) / 255  # stored at 8 px as [[0, 0], [0, 2]]
    levels = box_pyramid(img)
    assert sorted(levels) == [4, 8] and levels[4].dtype == np.float64
    np.testing.assert_allclose(levels[4], img.reshape(4, 2, 4, 2).mean(axis=(1, 3)))
    assert quantize(levels[8], np.uint8)[:2, :2].tolist() == [[0, 0], [0, 2]]
    assert quantize(levels[4], np.uint8)[0, 0] == 1  # 0.7375 rounded; the stored 8-px values average to 0.5 -> 0
    q = quantize(np.array([-0.5, 0.5 / 65535, 1.5 / 65535, 1.0, 2.0]), np.uint16)
    assert q.tolist() == [0, 0, 2, 65535, 65535]  # clipped, rounded half to even, no wrap at the top


@pytest.mark.parametrize("shape", [(12, 12), (10, 10), (16, 8), (2, 2)])
def test_box_pyramid_refuses_a_size_without_an_exact_pyramid(shape):
    # 12 px gave levels 12, 6, 3 (below the 4-px floor); 10 px a numpy broadcast error; 16 × 8 a
    # pyramid keyed by its height alone
    with pytest.raises(ValueError, match="square|power of two"):
        box_pyramid(np.zeros(shape))


def test_a_negative_manifest_row_is_refused(archive, tmp_path):
    """numpy reads row -1 from the end of the arrays: another image, silently."""
    copy = tmp_path / "copy"
    shutil.copytree(archive, copy)
    with open(copy / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[2]["row"] = "-1"
    with open(copy / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(UserError, match="row -1 is negative"):
        Archive(copy)


def test_the_stream_is_one_permutation_per_epoch_shared_out_by_rank(archive):
    arc = Archive(archive)
    train = arc.training_positions()
    assert train.tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12]  # no test row, ever
    one = BatchStream(arc, seed=3, subset=train)
    n = len(train)
    for epoch in range(3):
        assert sorted(one.positions(epoch * n, n)) == train.tolist()
    assert not np.array_equal(one.positions(0, n), one.positions(n, n))  # reshuffled by (seed, epoch)
    # batches of 7 (not dividing 10) and of 25 (more than the images) cross the epochs seamlessly
    np.testing.assert_array_equal(np.concatenate([one.positions(7 * i, 7) for i in range(10)]), one.positions(0, 70))
    assert len(one.positions(5, 25)) == 25
    for world in (2, 3):  # ranks: disjoint slices of the global batch, together one process's batch
        for start in (0, 6, 33):
            parts = [BatchStream(arc, seed=3, rank=r, world=world, subset=train).rank_positions(start, 4)
                     for r in range(world)]
            np.testing.assert_array_equal(np.concatenate(parts), one.positions(start, 4 * world))
    np.testing.assert_array_equal(BatchStream(arc, seed=3, subset=train).positions(17, 9), one.positions(17, 9))
    for rank, world in ((2, 2), (-1, 2), (0, 0)):  # read another rank's share (or past the batch) silently
        with pytest.raises(ValueError, match=f"rank {rank} is not one of the {world} processes"):
            BatchStream(arc, seed=3, rank=rank, world=world, subset=train)


def test_a_subset_mask_is_taken_as_its_positions_and_bad_positions_are_refused(archive):
    """A boolean subset (archive.held_out()'s kind) trained on positions 0 and 1 only, without a word;
    positions past the archive failed only when read."""
    arc = Archive(archive)
    train = arc.training_positions()
    mask = np.zeros(len(arc), bool)
    mask[train] = True
    np.testing.assert_array_equal(BatchStream(arc, seed=3, subset=mask).positions(0, 20),
                                  BatchStream(arc, seed=3, subset=train).positions(0, 20))
    for bad in (mask[:-1], [0, len(arc)], [-1, 2], [0.5, 1.0], [[0, 1]]):
        with pytest.raises(ValueError, match="subset"):
            BatchStream(arc, seed=3, subset=np.asarray(bad))


def test_the_prefetch_thread_hands_over_whatever_stops_it(archive):
    """A load that raises anything (here SystemExit) reaches get(): it used to end the thread with
    nothing handed over, and get() waited for ever."""
    stream = BatchStream(Archive(archive))

    def load(*req):
        raise SystemExit("stopped in the loader")

    stream.load = load
    p = Prefetcher(stream, torch.device("cpu"))
    got = []

    def consume():
        try:
            p.get()
        except BaseException as exc:  # what the thread handed over
            got.append(exc)

    p.request(0, 4, 8)
    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=10)
    p.close()
    assert not consumer.is_alive(), "get() waits for a batch that never comes"
    assert isinstance(got[0], SystemExit) and "stopped in the loader" in str(got[0])


def test_prefetched_batches_follow_the_stream_across_resolutions(archive):
    arc = Archive(archive)
    stream = BatchStream(arc, seed=1, subset=arc.training_positions())
    p = Prefetcher(stream, torch.device("cpu"))
    try:
        p.request(0, 4, 4)
        p.request(4, 4, 8)  # the next stage's resolution
        p.request(8, 4, 7)  # no such level: an error for this request, and the thread goes on
        p.request(12, 4, 8)
        for start, res in ((0, 4), (4, 8)):
            req, batch = p.get()
            assert req == (start, 4, res) and batch.dtype == torch.uint8
            np.testing.assert_array_equal(batch.numpy(), arc.images(np.sort(stream.positions(start, 4)), res))
        with pytest.raises(ValueError, match="no 7-px images"):
            p.get()
        assert p.get()[0] == (12, 4, 8)
    finally:
        p.close()


def test_every_phantom_consolidation_is_drawn():
    """The consolidation's patches were thresholded over the whole image, and in about one image in
    ten (17 % at 32 px) none of them fell in the lung it was drawn in: labelled, not drawn. With the
    other findings fixed (Infiltration draws the same noise), turning it on must brighten the lung."""
    others = {name: name == "Infiltration" for name in PHANTOM_FINDINGS}
    for seed in range(60):
        plain, _ = render(32, seed, {**others, "Consolidation": False})
        consolidated, have = render(32, seed, {**others, "Consolidation": True})
        assert have["Consolidation"]
        assert ((consolidated - plain) > 0.05).sum() >= 3, seed
