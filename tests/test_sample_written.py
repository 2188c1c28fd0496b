"""The sampled archive describes the files it wrote: the manifest's probabilities are the classifier's
on the written (clamped, quantised) pixels, and an LCO image meets its target there, not only in
the float image G gave before it was saved. A tiny generator and a random classifier whose
thresholds sit at the median of its probabilities, so that many calls lie near a threshold."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from xrayforge.nn import load_networks
from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig, load_classifier
from xrayforge.nn.latents import latents_for
from xrayforge.sample.lco import parse_target, satisfied, target_tensors
from xrayforge.sample.writer import SampleConfig, find_generator, sample_archive


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from xrayforge.data.prepare import prepare
    from xrayforge.train.trainer import TrainConfig, Trainer
    root = tmp_path_factory.mktemp("tiny")
    prepare("phantom:64", root / "data", resolution=16, workers=1, progress=False)
    Trainer(TrainConfig(str(root / "data"), str(root / "run"), start_resolution=16, stable_images=16, latent_dim=16,
                        fmap_base=32, fmap_max=8, batch={16: 16}), progress=False).train()
    torch.manual_seed(0)
    C = ChestClassifier(ClassifierConfig(arch="resnet18", input_size=16, width=8)).eval()
    G = load_networks(find_generator(root / "run"), names=["G_ema"])["G_ema"].eval()
    with torch.no_grad():
        med = torch.sigmoid(C(G(latents_for(0, range(512), G.config.latent_dim)))).median(0).values
    C.config.thresholds = {f: float(med[i]) for i, f in enumerate(C.findings)}
    C.save(root / "clf")
    return root / "run", root / "clf"


def _recorded_and_measured(folder, C):
    """(rows, the manifest's probabilities, the classifier's on the written files), the two equal."""
    rows, images = _written(folder)
    with torch.no_grad():
        p = torch.sigmoid(C(images))
    recorded = torch.tensor([[float(r[f"p_{f}"]) for f in C.findings] for r in rows])
    torch.testing.assert_close(recorded, p, rtol=0, atol=2e-6)
    return rows, recorded, p


def _written(folder):
    """Manifest rows, the written images back in [-1, 1], and the classifier's probabilities of them."""
    rows = list(csv.DictReader(open(folder / "manifest.csv", newline="")))
    pix = np.stack([np.asarray(Image.open(folder / r["file"])) for r in rows])
    top = float(np.iinfo(pix.dtype).max)
    images = torch.from_numpy(pix.astype(np.float32) / top)[:, None] * 2 - 1
    return rows, images


@pytest.mark.parametrize("fmt", ["png8", "png16"])
def test_manifest_probabilities_are_those_of_the_written_images(tiny, tmp_path, fmt):
    run, clf = tiny
    out = tmp_path / "u"
    sample_archive(SampleConfig(str(run), str(out), n=24, batch=8, format=fmt, classifier=str(clf)), progress=False)
    C = load_classifier(clf)
    rows, recorded, p = _recorded_and_measured(out, C)
    # and the labels the evaluations take from the manifest are the classifier's calls on those files
    thr = torch.tensor([C.threshold(f) for f in C.findings], dtype=torch.float64)
    assert torch.equal(recorded.double() >= thr, p.double() >= thr)


def test_lco_images_meet_their_target_as_written(tiny, tmp_path):
    run, clf = tiny
    out = tmp_path / "lco"
    targets = ["Cardiomegaly=1,Effusion=0", "Mass=1"]
    summary = sample_archive(SampleConfig(str(run), str(out), n=40, classifier=str(clf), targets=targets, steps=40,
                                          lr=0.1, starts=4, batch=8, shard_size=30), progress=False)
    C = load_classifier(clf)
    rows, recorded, p = _recorded_and_measured(out, C)
    for i, r in enumerate(rows):
        v, m, t = target_tensors(parse_target(r["target"], C.findings), C.findings, C.threshold)
        assert bool(satisfied(p[i:i + 1], v[None], m[None], t[None])[0]), f"image {r['index']} misses {r['target']}"
        assert bool(satisfied(recorded[i:i + 1], v[None], m[None], t[None])[0])
    assert all(summary["targets"][t]["accepted"] == 40 for t in targets)
    assert json.loads((out / "summary.json").read_text())["thresholds"] == {f: C.threshold(f) for f in C.findings}


def test_manifest_probabilities_keep_the_calls_at_the_recorded_thresholds(tiny, tmp_path):
    """A probability a hair from its threshold: the manifest must not round it across (the
    evaluations label each image by p_<finding> >= the recorded threshold)."""
    run, clf = tiny
    C = load_classifier(clf)
    sample_archive(SampleConfig(str(run), str(tmp_path / "a"), n=4, batch=4, classifier=str(clf)), progress=False)
    _, images = _written(tmp_path / "a")
    with torch.no_grad():  # as the writer classifies them: one batch of 4
        p = torch.sigmoid(C(images))
    exact = float(p[0, 1])
    rounded = round(exact, 6)
    assert rounded != exact
    meta = json.loads((clf / "classifier.json").read_text())
    meta["thresholds"][C.findings[1]] = (exact + rounded) / 2  # between the value and its 6-digit rounding
    moved = tmp_path / "clf"
    moved.mkdir()
    (moved / "classifier.pt").write_bytes((clf / "classifier.pt").read_bytes())
    (moved / "classifier.json").write_text(json.dumps(meta))
    sample_archive(SampleConfig(str(run), str(tmp_path / "b"), n=4, batch=4, classifier=str(moved)), progress=False)
    rows, _ = _written(tmp_path / "b")
    thr = json.loads((tmp_path / "b" / "summary.json").read_text())["thresholds"][C.findings[1]]
    assert (float(rows[0][f"p_{C.findings[1]}"]) >= thr) == (exact >= thr)


def test_lco_benchmark_times_its_own_latent_draws(tiny, monkeypatch):
    """Rejection sampling's time includes drawing its latents; LCO's must include drawing its n × S
    starting draws too (at 512 dimensions about 70 µs each on a CPU: on a GPU a large part of an LCO
    batch). Drawing them is made to take 1 s here: LCO's accepted/s must count that second."""
    import time

    import xrayforge.bench.lco as bench
    run, clf = tiny
    draw = bench.latents_for

    def slow(seed, indices, dim, truncation=None):
        if seed == 1234:  # the LCO rows' starting draws
            time.sleep(1.0)
        return draw(seed, indices, dim, truncation)
    monkeypatch.setattr(bench, "latents_for", slow)
    result = bench.run(str(run), str(clf), ["Mass=1"], n=4, steps=2, lr=0.1, census_n=0, max_realism=None, fid=False,
                       sample_n=2, starts=(2,))
    (row,) = result["rows"]
    if row["lco_hit_rate"]:
        assert row["lco_hit_rate"] * 4 / row["lco_accepted_s"] >= 1.0  # the seconds LCO took


def test_shell_radius_is_where_truncated_latents_lie():
    from xrayforge.sample.lco import shell_radius
    assert shell_radius(512) == pytest.approx(512 ** 0.5)
    for t in (0.5, 1.0, 2.0):
        norms = latents_for(3, range(400), 512, t).norm(dim=1)
        assert norms.mean().item() == pytest.approx(shell_radius(512, t), rel=0.01), t
    assert shell_radius(512, 50.0) == pytest.approx(512 ** 0.5)


def test_lco_keeps_truncated_latents_truncated(tiny, tmp_path):
    """With --truncation T, LCO's latents stay in the truncated distribution's support: every
    component within ±T, the norm near the truncated shell (the prior pulled them to sqrt(d) and
    components of 1.5–2.2 at T = 0.5)."""
    from xrayforge.sample.lco import shell_radius
    run, clf = tiny
    out = tmp_path / "t"
    target = "Cardiomegaly=1,Effusion=1,Mass=1"
    sample_archive(SampleConfig(str(run), str(out), n=12, batch=8, classifier=str(clf), targets=[target],
                                truncation=0.5, steps=60, lr=0.1, prior_weight=5.0), progress=False)
    rows = list(csv.DictReader(open(out / "manifest.csv", newline="")))
    z = torch.from_numpy(np.concatenate([np.load(out / f) for f in sorted({r["latent_file"] for r in rows})]))
    moved = [i for i, r in enumerate(rows) if int(r["lco_steps"]) > 0]
    assert moved, "no latent was optimised: the test would show nothing"
    assert z.abs().max().item() <= 0.5 + 1e-6
    norms = z[moved].norm(dim=1)
    assert (norms - shell_radius(z.shape[1], 0.5)).abs().max().item() < 0.25 * shell_radius(z.shape[1], 0.5)
    settings = json.loads((out / "sample_config.json").read_text())
    assert settings["lco_keeps_truncation"] is True
    # an archive begun before LCO kept truncated latents truncated cannot be continued by this one
    del settings["lco_keeps_truncation"]
    (out / "sample_config.json").write_text(json.dumps(settings))
    from xrayforge.errors import UserError
    with pytest.raises(UserError, match="begun by an earlier xrayforge whose LCO let truncated latents leave ±0.5"):
        sample_archive(SampleConfig(str(run), str(out), n=12, batch=8, classifier=str(clf), targets=[target],
                                    truncation=0.5, steps=60, lr=0.1, prior_weight=5.0), progress=False)


def test_an_lco_archive_begun_under_the_earlier_acceptance_rule_is_said_when_continued(tiny, tmp_path, caplog):
    """Before, an LCO image met as G gave it but not as stored was a rejection; now it takes another
    step. An archive begun the old way goes on (every image meets its target as stored either way),
    and says that its shards so far were made otherwise."""
    run, clf = tiny
    out = tmp_path / "a"
    cfg = SampleConfig(str(run), str(out), n=8, classifier=str(clf), targets=["Mass=1"], steps=20, lr=0.1, batch=4,
                       shard_size=4)
    sample_archive(cfg, progress=False)
    settings = json.loads((out / "sample_config.json").read_text())
    assert settings["lco_accepts_as_stored"] is True
    sample_archive(cfg, progress=False)
    assert "begun by an earlier xrayforge" not in caplog.text
    del settings["lco_accepts_as_stored"]
    (out / "sample_config.json").write_text(json.dumps(settings))
    (out / "shard-00001.csv").unlink()
    sample_archive(cfg, progress=False)
    assert "rejected an image met as G gave it but not as stored" in caplog.text
    assert json.loads((out / "sample_config.json").read_text())["lco_accepts_as_stored"] is True


def _first_attempt_fails_after_shard_zero(rank, world, run, clf, out, init_file):
    """Sample with an LCO pool that accepts every start as it is, except the first attempt of every shard
    after shard 0 (a target that shard 0 reaches at once and shard 1 at its second attempt)."""
    import torch.distributed as dist

    from xrayforge.sample import writer
    from xrayforge.sample.lco import LCOPool, LCOSample

    class Pool(LCOPool):
        def run(self, feed, keep=None):
            for key, z0, *_ in feed:
                if keep is not None and not keep(key):
                    continue
                t, a, sd, _ = key
                with torch.no_grad():
                    image = self.G(z0[None])[0]
                yield LCOSample(key, z0, z0, image, self.written(image[None])[0],
                                a > 0 or sd == writer._lco_seed(0, 0, t, 1), 0)

    original, writer.LCOPool = writer.LCOPool, Pool  # restored: the one-process call runs in pytest's process
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sample_archive(SampleConfig(str(run), str(out), n=2, shard_size=1, batch=1, classifier=str(clf),
                                    targets=["Mass=1"], starts=1, give_up_after=1), progress=False)
    finally:
        writer.LCOPool = original
        if world > 1:
            dist.destroy_process_group()


def test_torchrun_gives_up_on_a_target_only_where_one_process_would(tiny, tmp_path):
    """A target is declared unreachable only in its first shard: one process writes shard 1 after shard 0
    reached the target and goes on; under torchrun shard 1's process, not knowing of shard 0 yet, gave up,
    so the job failed where one process made the archive."""
    run, clf = tiny
    _first_attempt_fails_after_shard_zero(0, 1, run, clf, tmp_path / "one", None)
    torch.multiprocessing.spawn(_first_attempt_fails_after_shard_zero,
                                args=(2, run, clf, tmp_path / "two", tmp_path / "pg"), nprocs=2)
    one, two = (list(csv.DictReader(open(tmp_path / d / "manifest.csv", newline=""))) for d in ("one", "two"))
    assert one == two and [r["latent_index"] for r in two] == ["0", "1"]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["targets"]["Mass=1"]["rejected"] == 1


def test_a_colour_generator_is_refused_where_its_images_cannot_be_written_before_anything_is(tiny, tmp_path):
    """A three-channel generator (a converted pytorch_GAN_zoo one): 16-bit PNG (Pillow writes no
    16-bit colour PNG), DICOM (written as one grey channel) and a classifier of grey images are
    refused before the archive is begun, not once its first shard is made; 8-bit colour PNG is written."""
    from xrayforge.errors import UserError
    from xrayforge.nn import Generator, NetworkConfig, save_networks
    _, clf = tiny
    torch.manual_seed(0)
    ckpt = save_networks(tmp_path / "rgb", {"G_ema": Generator(NetworkConfig(resolution=8, latent_dim=8, fmap_base=16,
                                                                             fmap_max=8, image_channels=3))})
    for fmt, extra, says in (("png16", {}, "--format png16 writes one grey channel"),
                             ("dicom", {}, "--format dicom writes one grey channel"),
                             ("png8", {"classifier": str(clf)}, "the classifier .* takes grey")):
        out = tmp_path / fmt
        with pytest.raises(UserError, match=f"makes 3-channel images, and {says}"):
            sample_archive(SampleConfig(str(ckpt), str(out), n=2, format=fmt, **extra), progress=False)
        assert not out.exists()
    sample_archive(SampleConfig(str(ckpt), str(tmp_path / "colour"), n=2), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "colour" / "manifest.csv", newline="")))
    assert np.asarray(Image.open(tmp_path / "colour" / rows[0]["file"])).shape == (8, 8, 3)


def test_a_shard_is_held_as_the_files_integers_never_quantised_whole(tiny, tmp_path, monkeypatch):
    """A shard waits on the host until it is written: held as float images and quantised all at once, a
    1000-image shard at 1024 px took 4.2 GB and 12.6 GB at its peak (the float copies), where its 8-bit
    pixels are 1 GB. Each generator batch (or LCO image) is quantised as it comes."""
    from xrayforge.sample import writer
    run, clf = tiny
    sizes = []
    quantise = writer.to_uint

    def counted(images, bits=8):
        sizes.append(len(images))
        return quantise(images, bits)
    monkeypatch.setattr(writer, "to_uint", counted)
    sample_archive(SampleConfig(str(run), str(tmp_path / "u"), n=24, batch=8, classifier=str(clf)), progress=False)
    assert sizes and max(sizes) <= 8
    sizes.clear()
    sample_archive(SampleConfig(str(run), str(tmp_path / "l"), n=6, batch=4, classifier=str(clf), targets=["Mass=1"],
                                steps=10, lr=0.1), progress=False)
    assert sizes and max(sizes) == 1
    for out in (tmp_path / "u", tmp_path / "l"):  # and the files are still those the manifest describes
        _recorded_and_measured(out, load_classifier(clf))


def test_lco_starting_latents_are_apart_from_the_seeds_a_user_gives(tiny, tmp_path):
    """An LCO archive of --seed 0 drew its shard 0's starting latents from latent_for(1, ...), the
    latents of an unconditional archive of --seed 1 (and of `fid RUN --seed 1`): the two archives were
    correlated. LCO's streams now lie apart; an archive begun before keeps its streams to the end."""
    from xrayforge.sample.writer import LCO_STREAMS, _lco_seed
    run, clf = tiny
    out = tmp_path / "a"
    cfg = SampleConfig(str(run), str(out), n=4, classifier=str(clf), targets=["Mass=1", "Effusion=0"], steps=5,  # 8 images
                       lr=0.1, batch=4, shard_size=2, give_up_after=1000)
    sample_archive(cfg, progress=False)
    rows = list(csv.DictReader(open(out / "manifest.csv", newline="")))
    seeds = {int(r["latent_seed"]) for r in rows}
    assert seeds <= {_lco_seed(0, s, t, 2) for s in range(4) for t in range(2)} and min(seeds) > LCO_STREAMS
    settings = json.loads((out / "sample_config.json").read_text())
    assert settings["lco_streams_apart"] is True
    # begun before: shard 1 is made again from the old streams, and the settings stay as they were
    del settings["lco_streams_apart"]
    (out / "sample_config.json").write_text(json.dumps(settings))
    (out / "shard-00001.csv").unlink()
    sample_archive(cfg, progress=False)
    rows = list(csv.DictReader(open(out / "manifest.csv", newline="")))
    assert {int(r["latent_seed"]) for r in rows if r["file"].startswith("shard-00001")} <= \
        {_lco_seed(0, 1, t, 2, apart=False) for t in range(2)}
    assert "lco_streams_apart" not in json.loads((out / "sample_config.json").read_text())
    sample_archive(cfg, progress=False)  # and it goes on being continued


def test_an_absurd_number_of_images_is_refused_at_once(tmp_path):
    """--n 1e13 built a list of 1e10 shards before any message (memory filled first)."""
    from xrayforge.sample.writer import ArchiveSampler
    with pytest.raises(ValueError, match=r"--n 10000000000000: at most 1,000,000,000 images"):
        ArchiveSampler(SampleConfig(str(tmp_path / "run"), str(tmp_path / "out"), n=10 ** 13))
    with pytest.raises(ValueError, match=r"--n 600000000 for each of 2 targets: at most"):
        ArchiveSampler(SampleConfig(str(tmp_path / "run"), str(tmp_path / "out"), n=6 * 10 ** 8,
                                    targets=["Mass=1", "Mass=0"]))
    assert not (tmp_path / "out").exists()


def test_an_unreachable_targets_advice_fits_an_archive_with_finished_shards(tiny, tmp_path, monkeypatch):
    """A target given up in a later shard, after the archive has finished shards, was told to 'raise
    --steps or --lr', which the archive then refused (its settings are bound once a shard is finished):
    there the advice says a new --out; where no shard is finished it stays as it was."""
    import shutil
    from xrayforge.sample.writer import LCOUnreachable
    run, clf = tiny
    shutil.copytree(clf, tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    # a threshold no probability reaches (past 1: a classifier.json holding it is refused as damaged)
    from xrayforge.nn.classifier import ChestClassifier
    real_threshold = ChestClassifier.threshold
    monkeypatch.setattr(ChestClassifier, "threshold",
                        lambda self, f: 1.5 if f == "Cardiomegaly" else real_threshold(self, f))
    (tmp_path / "clf" / "classifier.json").write_text(json.dumps(meta))
    common = dict(n=1, classifier=str(tmp_path / "clf"), targets=["Effusion=0", "Cardiomegaly=1"], steps=2,
                  starts=1, batch=4, give_up_after=4, device="cpu")
    out = tmp_path / "a"
    with pytest.raises(LCOUnreachable) as e:  # target 1's first slot is in shard 1, after shard 0 is finished
        sample_archive(SampleConfig(str(run), str(out), shard_size=1, **common), progress=False)
    assert (out / "shard-00000.csv").is_file()
    assert "with a new --out" in str(e.value), e.value
    with pytest.raises(Exception, match="other settings"):  # what the advice says: --steps binds this archive
        sample_archive(SampleConfig(str(run), str(out), shard_size=1, **{**common, "steps": 4}), progress=False)
    with pytest.raises(LCOUnreachable) as e:  # one shard: nothing finished, --steps may change in place
        sample_archive(SampleConfig(str(run), str(tmp_path / "b"), shard_size=2, **common), progress=False)
    assert "raise --steps or --lr," in str(e.value) and "new --out" not in str(e.value), e.value


@pytest.mark.parametrize("name", [".xrayforge.json", "shard-00001.csv", "manifest.csv"])
def test_a_sample_killed_while_writing_a_file_is_finished_as_if_never_stopped(tiny, tmp_path, name):
    """A kill (SIGKILL: no clean-up runs) while a file was being written leaves atomic_write's hidden
    temporary. One of the folder's marker was never removed: with no marker, the next run claimed the
    folder as new, and only a marked folder's temporaries were cleared."""
    import subprocess
    import sys
    run, _ = tiny
    common = dict(n=6, batch=4, shard_size=4, device="cpu")
    sample_archive(SampleConfig(str(run), str(tmp_path / "whole"), **common), progress=False)
    out = tmp_path / "out"
    code = ("import os, sys\n"
            "from xrayforge.sample.writer import SampleConfig, sample_archive\n"
            "real = os.replace\n"
            "def replace(src, dst):\n"
            "    if os.path.basename(dst) == sys.argv[3]:\n"
            "        os._exit(9)  # died with the file written under its temporary name, before the rename\n"
            "    return real(src, dst)\n"
            "os.replace = replace\n"
            "sample_archive(SampleConfig(sys.argv[1], sys.argv[2], n=6, batch=4, shard_size=4, device='cpu'), "
            "progress=False)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(run), str(out), name], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert [p for p in out.iterdir() if p.name.startswith(f".{name}.")]  # what the kill left
    sample_archive(SampleConfig(str(run), str(out), **common), progress=False)

    def files(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name != "summary.json"}
    assert files(out) == files(tmp_path / "whole")  # every file, hidden ones included, byte for byte
