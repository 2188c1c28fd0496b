"""FID: the network against an independent implementation of pytorch-fid's, the statistics
against numpy / scipy, the preprocessing kernel against the reference, and the CLI."""
import json
import os
import re
import tempfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from xrayforge.cli import main as cli
from xrayforge.errors import UserError
from xrayforge.fid import (FrechetStats, StreamingMoments, compute_fid, frechet_distance, load_inception,
                           preprocess)
from xrayforge.fid.inception import WEIGHTS_NAME, FIDInception, find_weights
from xrayforge.fid.preprocess import reference as preprocess_reference

from conftest import kernel_params


# ------------------------------------------------------------------ an independent pytorch-fid network
def _conv(x, sd, name, stride=1, pad=True):
    w = sd[f"{name}.conv.weight"]
    padding = (w.shape[2] // 2, w.shape[3] // 2) if pad else 0
    y = F.conv2d(x, w, stride=stride, padding=padding)
    y = F.batch_norm(y, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                     sd[f"{name}.bn.bias"], False, 0.0, 0.001)
    return F.relu(y)


def _seq(x, sd, names):
    for n in names:
        x = _conv(x, sd, n)
    return x


def _pool_avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def pytorch_fid_features(images_01: torch.Tensor, sd: dict) -> torch.Tensor:
    """pytorch-fid: RGB in [0, 1] -> resize 299 bilinear -> 2x - 1 -> FID Inception -> pool3."""
    x = F.interpolate(images_01, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = _conv(x, sd, "Conv2d_1a_3x3", 2, False)
    x = _conv(x, sd, "Conv2d_2a_3x3", 1, False)
    x = F.max_pool2d(_conv(x, sd, "Conv2d_2b_3x3"), 3, 2)
    x = F.max_pool2d(_conv(_conv(x, sd, "Conv2d_3b_1x1"), sd, "Conv2d_4a_3x3", 1, False), 3, 2)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = torch.cat([_conv(x, sd, f"{m}.branch1x1"), _seq(x, sd, [f"{m}.branch5x5_1", f"{m}.branch5x5_2"]),
                       _seq(x, sd, [f"{m}.branch3x3dbl_{i}" for i in (1, 2, 3)]),
                       _conv(_pool_avg(x), sd, f"{m}.branch_pool")], 1)
    m = "Mixed_6a"
    x = torch.cat([_conv(x, sd, f"{m}.branch3x3", 2, False),
                   _conv(_seq(x, sd, [f"{m}.branch3x3dbl_1", f"{m}.branch3x3dbl_2"]), sd, f"{m}.branch3x3dbl_3", 2,
                         False), F.max_pool2d(x, 3, 2)], 1)
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = torch.cat([_conv(x, sd, f"{m}.branch1x1"), _seq(x, sd, [f"{m}.branch7x7_{i}" for i in (1, 2, 3)]),
                       _seq(x, sd, [f"{m}.branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
                       _conv(_pool_avg(x), sd, f"{m}.branch_pool")], 1)
    m = "Mixed_7a"
    x = torch.cat([_conv(_conv(x, sd, f"{m}.branch3x3_1"), sd, f"{m}.branch3x3_2", 2, False),
                   _conv(_seq(x, sd, [f"{m}.branch7x7x3_{i}" for i in (1, 2, 3)]), sd, f"{m}.branch7x7x3_4", 2, False),
                   F.max_pool2d(x, 3, 2)], 1)
    for m, use_max in (("Mixed_7b", False), ("Mixed_7c", True)):
        b3 = _conv(x, sd, f"{m}.branch3x3_1")
        bd = _seq(x, sd, [f"{m}.branch3x3dbl_1", f"{m}.branch3x3dbl_2"])
        pool = F.max_pool2d(x, 3, 1, 1) if use_max else _pool_avg(x)
        x = torch.cat([_conv(x, sd, f"{m}.branch1x1"),
                       torch.cat([_conv(b3, sd, f"{m}.branch3x3_2a"), _conv(b3, sd, f"{m}.branch3x3_2b")], 1),
                       torch.cat([_conv(bd, sd, f"{m}.branch3x3dbl_3a"), _conv(bd, sd, f"{m}.branch3x3dbl_3b")], 1),
                       _conv(pool, sd, f"{m}.branch_pool")], 1)
    return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random-weight file with pytorch-fid's keys and shapes (BatchNorm statistics included)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in FIDInception().state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
        elif k.endswith("running_var") or k.endswith("bn.weight"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("running_mean") or k.endswith("bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    return path, sd


def _png_folder(root, seeds, size=(24, 20)):
    root.mkdir(parents=True)
    for s in seeds:
        rng = np.random.default_rng(s)
        Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(root / f"img{s:03d}.png")
    return root


def test_features_equal_an_independent_pytorch_fid(weights_file):
    path, sd = weights_file
    model = load_inception(path)
    u8 = torch.randint(0, 256, (3, 37, 41), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    rgb01 = (u8.float() / 255).unsqueeze(1).expand(-1, 3, -1, -1)  # what pytorch-fid's loader makes of gray
    expected = pytorch_fid_features(rgb01, sd)
    with torch.no_grad():
        gray_folded = model(preprocess(u8, channels=1, backend="torch"))
        replicated = model(preprocess(u8, channels=3, backend="torch"))
    assert gray_folded.shape == (3, 2048)
    torch.testing.assert_close(replicated, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gray_folded, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fid_from_folders_equals_numpy_scipy(weights_file, tmp_path):
    path, sd = weights_file
    a = _png_folder(tmp_path / "a", range(5))
    b = _png_folder(tmp_path / "b", range(100, 106))
    (b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)
    result = compute_fid(str(a), str(b), inception=str(path), workers=0, batch_size=4, progress=False)
    assert (result["n_a"], result["n_b"]) == (5, 6)
    assert [s["file"].endswith("broken.png") for s in result["skipped"]] == [True]

    def feats(folder):
        imgs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in sorted(folder.glob("img*.png"))]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
        return pytorch_fid_features(x, sd).double().numpy()

    fa, fb = feats(a), feats(b)
    mu1, mu2, s1, s2 = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)  # newer scipy has no disp=
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    assert result["fid"] == pytest.approx(expected, rel=1e-5)


def _scipy_fid(a, b):
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)  # newer scipy has no disp=
    return ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean.real)


@pytest.mark.parametrize("n", [400, 30, 12], ids=["well-conditioned", "rank-deficient", "very-rank-deficient"])
def test_frechet_matches_scipy_at_small_dimension(n):
    rng = np.random.default_rng(n)
    d = 48
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    y = rng.standard_normal((n, d)) * 1.5 + 0.3
    a = FrechetStats(x.mean(0), np.cov(x, rowvar=False))
    b = FrechetStats(y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(a, b, "cpu") == pytest.approx(_scipy_fid(a, b), rel=1e-6)
    assert frechet_distance(a, a, "cpu") == pytest.approx(0.0, abs=1e-6 * np.trace(a.sigma))


def _fid_by_svd(x, y):
    """The Fréchet distance of two sample sets with fewer samples than features, exactly: the square
    roots of the eigenvalues of S1 S2 are the singular values of Yc Xc^T / sqrt((n1 - 1)(n2 - 1))."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    tr = np.linalg.svd(yc @ xc.T, compute_uv=False).sum() / np.sqrt((len(x) - 1) * (len(y) - 1))
    return ((x.mean(0) - y.mean(0)) ** 2).sum() + (xc ** 2).sum() / (len(x) - 1) + (yc ** 2).sum() / (len(y) - 1) - 2 * tr


def test_frechet_is_exact_and_symmetric_with_fewer_samples_than_features():
    """n - 1 < d: beyond its rank a covariance's eigenvalues are rounding, whose square roots
    summed over hundreds of them moved the distance by 1e-8 .. 1e-6 relative (and differently in
    each order)."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((20, 512)), 0)  # pool-feature-like: non-negative
    y = np.maximum(rng.standard_normal((15, 512)) + 0.2, 0) * 0.9
    a, b = FrechetStats.from_features(x), FrechetStats.from_features(y)
    exact = _fid_by_svd(x, y)
    assert frechet_distance(a, b, "cpu") == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(b, a, "cpu") == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(a, a, "cpu") == pytest.approx(0.0, abs=1e-12 * np.trace(a.sigma))


def test_streaming_moments_equal_numpy_including_a_large_mean():
    rng = np.random.default_rng(0)
    # a large mean with a small spread: the data itself carries only ~7 significant digits of
    # the deviations in float64, so agreement to 1e-5 of the covariance is all there is to have
    for x, tol in ((rng.standard_normal((1000, 24)), 1e-10), (1e6 + 1e-3 * rng.standard_normal((1000, 24)), 1e-5)):
        m = StreamingMoments(24)
        for chunk in np.array_split(x, 97):  # many uneven small batches
            m.update(torch.from_numpy(chunk))
        s, ref_cov = m.stats(), np.cov(x, rowvar=False)
        np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-13, atol=0)
        np.testing.assert_allclose(s.sigma, ref_cov, rtol=0, atol=tol * np.abs(ref_cov).max())
    # the raw-sums formula loses the large-mean case entirely; the streaming one does not
    big = 1e6 + 1e-3 * rng.standard_normal((1000, 3))
    raw = (big.T @ big - len(big) * np.outer(big.mean(0), big.mean(0))) / (len(big) - 1)
    assert np.abs(raw - np.cov(big, rowvar=False)).max() > 0.5 * np.abs(np.cov(big, rowvar=False)).max()


def test_stats_are_a_snapshot_that_later_batches_do_not_move():
    m = StreamingMoments(3)
    m.update(torch.ones(4, 3))
    m.update(torch.zeros(4, 3))
    before = m.stats()
    m.update(torch.full((8, 3), 5.0))
    np.testing.assert_array_equal(before.mu, np.full(3, 0.5))  # on the CPU .numpy() shares memory


def test_moments_merge_like_processes_and_runs(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)) + 5
    parts = [StreamingMoments(8) for _ in range(3)]
    for i, chunk in enumerate(np.array_split(x, 3)):
        parts[i].update(torch.from_numpy(chunk))
    parts[0].merge(parts[1])
    parts[0].merge(parts[2])
    np.testing.assert_allclose(parts[0].stats().sigma, np.cov(x, rowvar=False), atol=1e-12)
    s1 = StreamingMoments(8)
    s1.update(torch.from_numpy(x[:100]))
    s2 = StreamingMoments(8)
    s2.update(torch.from_numpy(x[100:]))
    merged = s1.stats().merge(s2.stats())
    np.testing.assert_allclose(merged.sigma, np.cov(x, rowvar=False), atol=1e-12)
    assert merged.n == 300


def test_stats_files_round_trip_and_pytorch_fid_layout(tmp_path):
    rng = np.random.default_rng(2)
    s = FrechetStats(rng.standard_normal(5), np.eye(5) * 2, 42)
    s.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        assert set(f.files) == {"mu", "sigma", "n"}
    back = FrechetStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, s.mu)
    assert back.n == 42
    np.savez(tmp_path / "pf.npz", mu=s.mu, sigma=s.sigma)  # what pytorch-fid --save-stats writes
    assert FrechetStats.load(tmp_path / "pf.npz").n is None
    np.savez(tmp_path / "bad.npz", m=s.mu)
    with pytest.raises(ValueError, match="no mu, sigma in it"):
        FrechetStats.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("field, value, said", [
    ("mu", lambda s: s.mu + 1j, "mu is not real numbers (it holds complex128)"),
    ("sigma", lambda s: s.sigma.astype(bool), "sigma is not real numbers (it holds bool)"),
    ("n", lambda s: np.float64(2.7), "n, the sample count, must be one whole number (it is 2.7)"),
    ("n", lambda s: np.array([40, 2]), "n, the sample count, must be one whole number (it is [40, 2])"),
    ("n", lambda s: np.float64("nan"), "n, the sample count, must be one whole number (it is nan)"),
    ("mode", lambda s: np.array("slow"), "mode 'slow' is not an Inception mode"),
])
def test_stats_files_with_loose_fields_are_refused(tmp_path, field, value, said):
    """A complex mu lost its imaginary part unsaid, n = 2.7 read as 2, a mode no code writes was kept."""
    s = FrechetStats(np.arange(3.0), np.eye(3), 40, mode="exact")
    fields = {"mu": s.mu, "sigma": s.sigma, "n": np.int64(40), "mode": np.array("exact")}
    np.savez(tmp_path / "s.npz", **{**fields, field: value(s)})
    with pytest.raises(UserError, match=re.escape(f"s.npz: {said}")):
        FrechetStats.load(tmp_path / "s.npz")
    np.savez(tmp_path / "ok.npz", **{**fields, "n": np.float64(40.0)})  # a whole float is a count
    assert FrechetStats.load(tmp_path / "ok.npz").n == 40


def test_stats_files_text_fields_stored_as_bytes_or_an_array_of_one_are_read_as_text(tmp_path):
    """A mode stored as bytes (numpy's 'S' arrays) read "b'fast'" and was refused as no Inception mode;
    a feature space so stored matched no space, and the distance was refused as of two spaces."""
    s = FrechetStats(np.arange(3.0), np.eye(3), 40, "inception", "fast")
    s.save(tmp_path / "ours.npz")
    for i, (space, mode) in enumerate([(np.array(b"inception"), np.array(b"fast")),
                                       (np.array(["inception"]), np.array([b"fast"]))]):
        np.savez(tmp_path / f"b{i}.npz", mu=s.mu, sigma=s.sigma, n=np.int64(40), feature_space=space, mode=mode)
        got = FrechetStats.load(tmp_path / f"b{i}.npz")
        assert (got.space, got.mode) == ("inception", "fast")
        assert frechet_distance(got, FrechetStats.load(tmp_path / "ours.npz"), "cpu") == pytest.approx(0, abs=1e-9)
    for bad, said in ((np.array(3), "mode is not one text value (it holds int64"),
                      (np.array(["fast", "exact"]), "mode is not one text value"),
                      (np.array(b"\xff"), "mode is not text")):
        np.savez(tmp_path / "bad.npz", mu=s.mu, sigma=s.sigma, mode=bad)
        with pytest.raises(UserError, match=re.escape(f"bad.npz: {said}")):
            FrechetStats.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("kb", [p for p in kernel_params() if p.values[0][0] == "triton"])  # no CUDA-extension kernel
@pytest.mark.parametrize("case", [((2, 37, 53), torch.uint8), ((1, 400, 300), torch.int32), ((2, 20, 20, 3), torch.uint8),
                                  ((2, 1, 31, 31), torch.float32), ((1, 299, 299), torch.uint8)], ids=str)
@pytest.mark.parametrize("channels", [1, 3])
def test_preprocessing_kernel_matches_reference(kb, case, channels):
    backend, device = kb
    shape, dtype = case
    g = torch.Generator().manual_seed(0)
    if dtype == torch.float32:
        x = torch.rand(shape, generator=g)
    else:
        top = 255 if dtype == torch.uint8 else 65535
        x = torch.randint(0, top + 1, shape, generator=g).to(dtype)
    ours = preprocess(x.to(device), channels=channels, backend=backend).cpu()
    ref = preprocess_reference(x, channels=ours.shape[1])
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    # the kernel computes sample positions in float32 (as PyTorch does on CUDA); the CPU reference
    # uses float64 positions: they differ by a few float32 roundings
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_weights_of_another_network_say_what_does_not_fit(tmp_path):
    sd = FIDInception().state_dict()
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # torchvision's ImageNet head
    sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(sd, tmp_path / "torchvision.pth")
    with pytest.raises(ValueError, match=r"1 unexpected keys, e.g. AuxLogits.*2 wrong shapes, e.g. fc.weight \(1000, 2048\)"):
        load_inception(tmp_path / "torchvision.pth")
    torch.save({"state_dict": FIDInception().state_dict()}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="not a state dict of tensors: it holds state_dict"):
        load_inception(tmp_path / "wrapped.pth")


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAYFORGE_INCEPTION", str(tmp_path / "nowhere.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"(?s)pt_inception-2015-12-05-6726825d.pth not found.*--inception"):
        find_weights()
    assert cli(["fid", str(tmp_path), str(tmp_path), "-q"]) == 1


def test_an_inception_variable_naming_no_file_is_said_not_passed_over(tmp_path, monkeypatch):
    """XRAYFORGE_INCEPTION naming a folder or a missing file was passed over for the torch hub cache's
    file: a mistyped path ran with other weights than the ones asked for, without a word."""
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(FIDInception().state_dict(), hub / WEIGHTS_NAME)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("XRAYFORGE_INCEPTION", raising=False)
    assert find_weights() == hub / WEIGHTS_NAME
    for where, why in ((tmp_path / "typo.pth", "no such file"), (tmp_path, "a folder")):
        monkeypatch.setenv("XRAYFORGE_INCEPTION", str(where))
        with pytest.raises(FileNotFoundError, match=f"not found at XRAYFORGE_INCEPTION=.* \\({why}\\); point it"):
            find_weights()
    assert find_weights(hub / WEIGHTS_NAME) == hub / WEIGHTS_NAME  # --inception is taken before the variable


def test_cli_json_and_save_stats(weights_file, tmp_path, capsys):
    path, _ = weights_file
    a = _png_folder(tmp_path / "a", range(3), size=(16, 16))
    b = _png_folder(tmp_path / "b", range(10, 13), size=(16, 16))
    assert cli(["fid", str(a), str(b), "--inception", str(path), "--json", "--workers", "0", "-q",
                "--save-stats", str(tmp_path / "a.npz")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"fid", "n_a", "n_b", "mode"} <= set(out) and out["n_a"] == 3 and out["mode"] == "exact"
    # the saved statistics give the same FID against the folder
    assert cli(["fid", str(tmp_path / "a.npz"), str(b), "--inception", str(path), "--json", "--workers", "0",
                "-q"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-9)
    assert cli(["fid", str(a), "--inception", str(path), "--save-stats", str(tmp_path / "only.npz"), "--workers",
                "0", "-q"]) == 0
    assert FrechetStats.load(tmp_path / "only.npz").n == 3
    assert FrechetStats.load(tmp_path / "only.npz").mode == "exact"


@pytest.mark.slow
def test_statistics_record_their_mode_and_mixing_modes_is_said(tmp_path, caplog):
    rng = np.random.default_rng(3)
    for name, mode, d in (("fast.npz", "fast", 6), ("exact.npz", "exact", 6), ("fast-2048.npz", "fast", 2048)):
        s = FrechetStats.from_features(rng.normal(size=(40, d)), None if d == 6 else "inception-random")
        s.mode = mode
        s.save(tmp_path / name)
    assert FrechetStats.load(tmp_path / "fast.npz").mode == "fast"
    # what the files were measured in, not the default --mode
    assert compute_fid(str(tmp_path / "fast.npz"), str(tmp_path / "fast.npz"))["mode"] == "fast"
    with caplog.at_level("WARNING"):
        assert compute_fid(str(tmp_path / "fast.npz"), str(tmp_path / "exact.npz"))["mode"] == "fast / exact"
        folder = _png_folder(tmp_path / "imgs", range(3), size=(16, 16))
        compute_fid(str(tmp_path / "fast-2048.npz"), str(folder), random_weights=True, workers=0, progress=False)
    assert "holds statistics of --mode fast and" in caplog.text
    assert "holds statistics of --mode fast, the other side is measured in --mode exact" in caplog.text
    assert f"{folder}: 3 images for 2048 feature dimensions: a singular covariance" in caplog.text


def test_an_input_with_too_few_readable_images_is_named_with_the_reasons(tmp_path, monkeypatch, capsys):
    a = _png_folder(tmp_path / "a", range(3), size=(16, 16))
    b = _png_folder(tmp_path / "b", [7], size=(16, 16))
    (b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)
    monkeypatch.chdir(tmp_path)  # where A's statistics are kept when B fails
    assert cli(["fid", str(a), str(b), "--random-weights", "-q", "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert f"{b}: 1 readable image(s) (1 skipped)" in err and "skipped " in err and "broken.png" in err
    assert f"{a}'s statistics were saved to fid-stats-a-" in err
    (b / "img007.png").unlink()
    (b / "broken2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)  # two candidates: one is refused up front
    assert cli(["fid", str(b), str(a), "--random-weights", "-q", "--workers", "0"]) == 1
    assert f"{b}: 0 readable image(s) (2 skipped)" in capsys.readouterr().err


def test_saving_statistics_leaves_no_temporary_file_when_interrupted(tmp_path, monkeypatch):
    def interrupted(file, **arrays):
        (file if hasattr(file, "write") else open(file, "wb")).write(b"PK\x03\x04 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        FrechetStats(np.zeros(3), np.eye(3), 5).save(tmp_path / "s.npz")
    assert list(tmp_path.iterdir()) == []


def _no_weights(tmp_path, monkeypatch):
    """No Inception weights anywhere xrayforge looks (and torch's hub cache is an empty folder)."""
    monkeypatch.setenv("XRAYFORGE_INCEPTION", str(tmp_path / "missing" / "nowhere.pth"))
    (tmp_path / "torch_home").mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would override TORCH_HOME
    with pytest.raises(FileNotFoundError):
        find_weights()


def _two_stats_files(tmp_path):
    rng = np.random.default_rng(7)
    fa, fb = rng.normal(size=(40, 6)), rng.normal(0.3, 1.2, size=(50, 6))
    sa, sb = FrechetStats.from_features(fa), FrechetStats.from_features(fb)
    pa, pb = sa.save(tmp_path / "a.npz"), tmp_path / "b.npz"
    np.savez(pb, mu=sb.mu, sigma=sb.sigma)  # pytorch-fid's layout: no n
    return sa, sb, pa, pb


def test_cli_fid_of_two_stats_files_needs_no_weights(tmp_path, monkeypatch, capsys):
    _no_weights(tmp_path, monkeypatch)
    sa, sb, pa, pb = _two_stats_files(tmp_path)
    expected = frechet_distance(sa, sb)
    assert cli(["fid", str(pa), str(pb), "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fid"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out["fid"] == pytest.approx(compute_fid(str(pa), str(pb))["fid"], rel=1e-12, abs=1e-12)
    assert out["n_a"] == 40 and out["n_b"] is None and out["skipped"] == [] and "not used" in out["inception"]
    assert cli(["fid", str(pa), str(pb), "-q"]) == 0
    assert capsys.readouterr().out.startswith(f"FID {expected:.4f}  (n_a=40, n_b=None")
    # --save-stats copies A's statistics, still without weights
    assert cli(["fid", str(pa), str(pb), "-q", "--save-stats", str(tmp_path / "copy.npz")]) == 0
    np.testing.assert_array_equal(FrechetStats.load(tmp_path / "copy.npz").sigma, sa.sigma)


def test_cli_fid_of_stats_files_refuses_what_needs_features(tmp_path, monkeypatch, capsys):
    _no_weights(tmp_path, monkeypatch)
    _, _, pa, pb = _two_stats_files(tmp_path)
    assert cli(["fid", str(pa), str(pb), "--kid", "3", "-q"]) == 1
    assert "need images on both sides" in capsys.readouterr().err
    # one side of images still needs the network, hence the weights, and says where to put them
    folder = _png_folder(tmp_path / "imgs", range(3), size=(16, 16))
    assert cli(["fid", str(pa), str(folder), "-q", "--workers", "0"]) == 1
    assert "pt_inception-2015-12-05-6726825d.pth not found" in capsys.readouterr().err


def test_cli_fid_says_a_missing_input_before_missing_weights(tmp_path, monkeypatch, capsys):
    """Without weights, `fid folder nonexist` said the weights were missing: the typo came to light
    only once they were found."""
    _no_weights(tmp_path, monkeypatch)
    folder = _png_folder(tmp_path / "imgs", range(3), size=(16, 16))
    for missing, said in (("nonexist", "nonexist: no such file or folder"),
                          ("gone.npz", "gone.npz: no such statistics file")):
        assert cli(["fid", str(folder), str(tmp_path / missing), "-q"]) == 1
        err = capsys.readouterr().err
        assert said in err and "pt_inception" not in err, err


@pytest.mark.slow
def test_kid_and_bootstrap_on_random_weights(tmp_path):
    a = _png_folder(tmp_path / "a", range(6), size=(16, 16))
    b = _png_folder(tmp_path / "b", range(20, 26), size=(16, 16))
    r = compute_fid(str(a), str(b), random_weights=True, workers=0, progress=False, kid_subsets=3, bootstrap=2)
    assert r["fid_ci95"][0] <= r["fid_ci95"][1] and "kid" in r and "random weights" in r["inception"]
    # 6 images a side, subsets of up to 1000: every subset is the whole of both sets, so no spread
    assert np.isnan(r["kid_std"])
    from xrayforge.fid.compute import kid
    rng = np.random.default_rng(0)
    fa, fb = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 1
    mean, std = kid(fa, fb, subsets=20, subset_size=10)
    whole, no_spread = kid(fa, fb, subsets=3, subset_size=1000)
    assert std > 0 and np.isnan(no_spread) and abs(mean - whole) < 4 * std


def _mmd2_by_hand(x, y):
    """Bińkowski et al.'s unbiased MMD² with the kernel k(u, v) = (u·v / d + 1)³, pair by pair in
    float64: within-set pairs i ≠ j, cross pairs all m² (as clean-fid and torch-fidelity take it)."""
    m, d = len(x), x.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3
    same = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return same / (m * (m - 1)) - 2 * cross / m ** 2


def test_kid_is_the_unbiased_mmd_by_hand_over_seeded_subsets():
    """Subsets of min(subset size, each side's count) drawn without replacement from each side, the
    mean and (population) std of their unbiased MMD²; a subset larger than one side or both, one
    side of 3 against 200, float32 features, the same value for the same seed; identical sets give
    a KID a little below 0, said as it is (not clamped)."""
    from xrayforge.fid.compute import kid
    rng = np.random.default_rng(3)
    for na, nb, size in ((30, 30, 10), (7, 40, 20), (12, 15, 100), (3, 200, 50), (9, 9, 9)):
        fa, fb = rng.normal(size=(na, 5)), rng.normal(0.4, 1.3, size=(nb, 5)).astype(np.float32)
        m, pick = min(size, na, nb), np.random.default_rng(0)
        vals = [_mmd2_by_hand(fa[pick.choice(na, m, replace=False)],
                              fb[pick.choice(nb, m, replace=False)].astype(np.float64)) for _ in range(6)]
        mean, std = kid(fa, fb, subsets=6, subset_size=size)
        assert mean == pytest.approx(np.mean(vals), rel=1e-10, abs=1e-12)
        if m == na == nb:  # every subset is both whole sets
            assert np.isnan(std)
        else:
            assert std == pytest.approx(np.std(vals), rel=1e-9)
        np.testing.assert_equal(kid(fa, fb, subsets=6, subset_size=size), (mean, std))
    f = rng.normal(size=(20, 4))
    mean, std = kid(f, f, subsets=3)
    assert mean < 0 and mean == pytest.approx(_mmd2_by_hand(f, f), rel=1e-10) and np.isnan(std)
    with pytest.raises(ValueError, match="KID needs at least 1 subset"):
        kid(f, f, subsets=0)


def test_the_bootstrap_interval_holds_the_fid_it_is_for():
    """The percentile interval of the resamples' FIDs lay above the FID of the features themselves
    (D = 16, 400 a side: FID 0.39, interval [0.66, 0.93]): a resample repeats a third of its rows,
    which raises its FID. Moved by the resamples' mean excess it holds the FID; it is the same for
    the same seed, and rows resampled with replacement, as a reference computes it here."""
    from xrayforge.fid.compute import bootstrap_fid
    rng = np.random.default_rng(0)
    stats = FrechetStats.from_features
    for d, n, shift in ((16, 400, 0.0), (16, 400, 0.3), (32, 100, 0.2)):
        fa, fb = rng.normal(size=(n, d)).astype(np.float32), (rng.normal(size=(n, d)) + shift).astype(np.float32)
        point = frechet_distance(stats(fa), stats(fb), "cpu")
        lo, hi = bootstrap_fid(fa, fb, 40, seed=1, device="cpu")
        assert lo <= point <= hi and 0 < hi - lo < point + 1, (point, lo, hi)
        assert bootstrap_fid(fa, fb, 40, seed=1, device="cpu") == (lo, hi)
        pick, vals = np.random.default_rng(1), []
        for _ in range(40):
            a, b = fa[pick.integers(0, n, n)], fb[pick.integers(0, n, n)]
            vals.append(frechet_distance(stats(a), stats(b), "cpu"))
        ref = np.percentile(vals, [2.5, 97.5]) - (np.mean(vals) - point)
        assert (lo, hi) == pytest.approx(tuple(np.maximum(ref, 0)), rel=1e-9)
    # one set against itself: FID 0, and an interval from 0
    lo, hi = bootstrap_fid(fa, fa, 20, device="cpu")
    assert lo == 0 < hi


def test_too_few_bootstrap_resamples_or_kid_subsets_are_refused_before_reading(small_space, tmp_path, monkeypatch,
                                                                              capsys):
    """--bootstrap 1 printed '95% CI [x, x]', one resample's FID (often not holding the FID); a
    negative count through the API failed with an IndexError after both sides were read."""
    a = _png_folder(tmp_path / "a", range(4), size=(16, 16))
    b = _png_folder(tmp_path / "b", range(4, 8), size=(16, 16))
    read = _spy_compute(monkeypatch)
    kw = dict(features=small_space, workers=0, progress=False, device="cpu")
    for what, said in ((dict(bootstrap=1), "--bootstrap 1: a bootstrap interval needs at least 2 resamples"),
                       (dict(bootstrap=-2), "--bootstrap -2: a bootstrap interval needs at least 2"),
                       (dict(kid_subsets=-1), "--kid -1: the number of KID subsets must be 0")):
        with pytest.raises(ValueError, match=said):
            compute_fid(str(a), str(b), **kw, **what)
    assert read == []
    assert cli(["fid", str(a), str(b), "--bootstrap", "1", "--features", small_space, "--workers", "0",
                "--device", "cpu", "-q"]) == 1
    assert "--bootstrap 1: a bootstrap interval needs at least 2 resamples" in capsys.readouterr().err
    assert read == []


def test_fid_of_a_generator_equals_that_of_the_images_it_samples(learned_gan, tmp_path, capsys):
    """A checkpoint input makes its images on the fly, quantised like `xrayforge sample`'s PNGs:
    against the archive `sample` wrote with the same seed, the distance is that of equal sets."""
    from xrayforge.sample.writer import SampleConfig, sample_archive
    data, run = learned_gan
    sample_archive(SampleConfig(str(run), str(tmp_path / "s"), n=24, seed=3, batch=8), progress=False)
    same = compute_fid(str(run), str(tmp_path / "s"), n=24, seed=3, random_weights=True, progress=False, workers=0)
    apart = compute_fid(str(run), str(data), n=24, seed=3, random_weights=True, progress=False, workers=0, limit=24)
    assert same["n_a"] == same["n_b"] == 24 and apart["n_a"] == 24
    assert abs(same["fid"]) < 1e-6 * apart["fid"]
    assert cli(["fid", str(run), str(tmp_path / "s"), "--n", "24", "--seed", "3", "--random-weights",
                "--json", "-q", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(same["fid"], abs=1e-9)


def test_fid_of_a_colour_generator_equals_that_of_the_rgb_files_it_samples(tmp_path):
    """A 3-channel generator (a converted pytorch_GAN_zoo checkpoint) is sampled to RGB PNGs, which
    a folder input reads as Pillow's luminance; its checkpoint input took the red channel alone."""
    from PIL import Image
    from xrayforge.nn import Generator, NetworkConfig, save_networks
    from xrayforge.sample.writer import SampleConfig, sample_archive
    torch.manual_seed(0)
    G = Generator(NetworkConfig(resolution=16, latent_dim=16, image_channels=3, channels=[16, 16, 16])).eval()
    G.set_level(2, 1.0)
    with torch.no_grad():
        for p in G.to_rgb.parameters():
            p.mul_(5)  # channels far apart
    save_networks(tmp_path / "ck", {"G": G, "G_ema": G})
    sample_archive(SampleConfig(str(tmp_path / "ck"), str(tmp_path / "s"), n=12, seed=3, batch=4), progress=False)
    with Image.open(next((tmp_path / "s").rglob("*.png"))) as im:
        assert im.mode == "RGB"
    kw = dict(n=12, random_weights=True, progress=False, workers=0, device="cpu")
    same = compute_fid(str(tmp_path / "ck"), str(tmp_path / "s"), seed=3, **kw)
    apart = compute_fid(str(tmp_path / "ck"), str(tmp_path / "s"), seed=0, **kw)
    assert apart["fid"] > 0 and abs(same["fid"]) < 1e-6 * apart["fid"]
    from xrayforge.fid.compute import stored_grey  # every pixel value, as Pillow converts it
    rgb = torch.randint(0, 256, (4, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pillow = [np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).convert("L")) for x in rgb]
    np.testing.assert_array_equal(stored_grey(rgb).numpy(), np.stack(pillow))


def _fid_rank(rank, world, a, b, init_file, result):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        r = compute_fid(str(a), str(b), random_weights=True, workers=0, progress=False, kid_subsets=5,
                        bootstrap=4, prdc=True, batch_size=4)
        if rank == 0:
            torch.save(r, result)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_kid_interval_and_prdc_of_all_images(tmp_path):
    """Under torchrun each process reads a share; KID, the bootstrap interval and precision / recall
    must still come from every image (they came from process 0's share), equal to one process's."""
    import torch.multiprocessing as tmp_mp
    a = _png_folder(tmp_path / "a", range(9), size=(16, 16))
    b = _png_folder(tmp_path / "b", range(20, 27), size=(16, 16))
    one = compute_fid(str(a), str(b), random_weights=True, workers=0, progress=False, kid_subsets=5, bootstrap=4,
                      prdc=True, batch_size=4)
    tmp_mp.spawn(_fid_rank, args=(2, a, b, tmp_path / "pg", tmp_path / "two.pt"), nprocs=2)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert two["n_a"] == 9 and two["n_b"] == 7
    for key in ("fid", "kid", "precision", "recall", "density", "coverage"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert two["fid_ci95"] == pytest.approx(one["fid_ci95"], rel=1e-6)


def test_the_features_kept_for_kid_and_prdc_are_a_uniform_sample_in_any_order():
    """Kept: the images of smallest key (a hash of the image's name and the seed), so the sample is
    uniform over the stream (thinning the pool again and again over-weighted the last images), and
    the same whatever order or batches the images come in."""
    from xrayforge.fid.compute import FeatureExtractor, _sample_keys
    ex = FeatureExtractor(random_weights=True, progress=False, keep_features=100, seed=3)
    ex.features = lambda images: images.float()[:, :1].repeat(1, ex.dim)  # the image's index as its feature

    def stream(order, batch):
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            yield torch.tensor(idx, dtype=torch.float32)[:, None], [f"img{i}" for i in idx], []
    n = 5000
    kept = ex._consume(stream(list(range(n)), 64), n, "t", "folder").features[:, 0].astype(int)
    keys = _sample_keys([f"img{i}" for i in range(n)], 3)
    assert sorted(kept.tolist()) == sorted(np.argsort(keys)[:100].tolist())
    assert 8 <= int((kept >= 0.8 * n).sum()) <= 35  # about a fifth from the last fifth (it was half)
    shuffled = list(np.random.default_rng(0).permutation(n))
    again = ex._consume(stream(shuffled, 37), n, "t", "folder").features[:, 0].astype(int)
    assert again.tolist() == kept.tolist()  # the same sample, in the same (key) order


def test_what_one_side_cannot_give_is_said_before_the_other_is_read(tmp_path, monkeypatch):
    """--prdc with a side of 3 images, or --kid with a statistics file: said before the other side's
    images go through the network (it was said after both were read)."""
    from xrayforge.fid.compute import FeatureExtractor
    few = _png_folder(tmp_path / "few", range(3), size=(16, 16))
    many = _png_folder(tmp_path / "many", range(3, 13), size=(16, 16))
    read = []
    compute = FeatureExtractor.compute
    monkeypatch.setattr(FeatureExtractor, "compute", lambda self, spec, *a: read.append(spec) or compute(self, spec, *a))
    kw = dict(random_weights=True, workers=0, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"few: 3 readable images; --prdc needs more than 5 a side"):
        compute_fid(str(few), str(many), prdc=True, **kw)
    assert read == [str(few)]
    stats = FrechetStats.from_features(np.random.default_rng(0).normal(size=(40, 2048)))
    stats.space = "inception-random"
    stats.save(tmp_path / "a.npz")
    read.clear()
    with pytest.raises(ValueError, match="need images on both sides"):
        compute_fid(str(tmp_path / "a.npz"), str(many), kid_subsets=3, **kw)
    assert read == []


def test_inception_options_that_contradict_are_refused(tmp_path):
    from xrayforge.errors import UserError
    from xrayforge.fid.inception import load_inception
    with pytest.raises(UserError, match="the weights file or a random network, not both"):
        load_inception(tmp_path / "w.pth", random_weights=True)
    with pytest.raises(FileNotFoundError, match="is a folder; expected the FID Inception weights file"):
        load_inception(tmp_path)


def test_a_wrongly_recorded_count_drops_no_real_eigenvalue():
    """The distance leaves out the eigenvalues past a covariance's rank n - 1 only where they are
    rounding: statistics whose n says 5 while their covariance has full rank give the full distance."""
    rng = np.random.default_rng(3)
    fa, fb = rng.normal(size=(400, 32)), rng.normal(size=(300, 32)) * 1.3 + 0.2
    full = frechet_distance(FrechetStats.from_features(fa), FrechetStats.from_features(fb))
    wrong = FrechetStats.from_features(fa)
    wrong.n = 5
    assert frechet_distance(wrong, FrechetStats.from_features(fb)) == pytest.approx(full, rel=1e-12)


def test_grey_and_colour_images_of_different_sizes_in_one_batch(tmp_path):
    from xrayforge.fid.compute import FeatureExtractor
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (40, 32), dtype=np.uint8)),
              torch.from_numpy(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)),
              torch.from_numpy(rng.integers(0, 256, (33, 35), dtype=np.uint8))]
    ex = FeatureExtractor(random_weights=True, device="cpu", workers=0, progress=False)
    got = ex.features(images)
    alone = torch.cat([ex.features(t.unsqueeze(0)) for t in images])
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def small_space(tmp_path_factory):
    """--features of a small classifier (64-d): its distances take milliseconds where Inception's
    2048-d ones take seconds."""
    from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig
    path = tmp_path_factory.mktemp("space") / "clf"
    ChestClassifier(ClassifierConfig(input_size=32, width=8)).save(path)
    return f"classifier:{path}"


def _spy_compute(monkeypatch):
    """The inputs FeatureExtractor.compute is asked to read, in order."""
    from xrayforge.fid.compute import FeatureExtractor
    read = []
    compute = FeatureExtractor.compute
    monkeypatch.setattr(FeatureExtractor, "compute", lambda self, spec, *a: read.append(spec) or compute(self, spec, *a))
    return read


def test_one_folder_on_both_sides_is_read_once_and_its_unreadable_files_listed_once(small_space, tmp_path, monkeypatch,
                                                                                    capsys):
    """`fid A A` (or A and ./A/) listed each unreadable file twice, and read A twice; folders that
    overlap are read each, and a file in both is listed once, with both sides."""
    a = _png_folder(tmp_path / "a", range(3), size=(16, 16))
    (a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)
    read = _spy_compute(monkeypatch)
    kw = dict(features=small_space, workers=0, progress=False, device="cpu")
    r = compute_fid(str(a), f"{tmp_path}/./a/", **kw)
    assert [(s["file"], s.get("inputs")) for s in r["skipped"]] == [(str(a / "broken.png"), ["a", "b"])]
    assert read == [str(a)] and r["n_a"] == r["n_b"] == 3 and r["fid"] < 1e-9
    assert "reason" in r["skipped"][0]
    assert cli(["fid", str(a), str(a), "--features", small_space, "-q", "--workers", "0", "--device", "cpu"]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")] == \
        [f"skipped {a / 'broken.png'}: {r['skipped'][0]['reason']}"]
    sub = _png_folder(a / "sub", range(10, 12), size=(16, 16))
    (a / "broken.png").rename(sub / "broken.png")
    read.clear()
    r = compute_fid(str(a), str(sub), **kw)
    assert [(s["file"], s.get("inputs")) for s in r["skipped"]] == [(str(sub / "broken.png"), ["a", "b"])]
    assert read == [str(a), str(sub)] and (r["n_a"], r["n_b"]) == (5, 2)


@pytest.mark.parametrize("bad, n, said", [
    ("nonexist", None, "nonexist: no such file or folder"),
    ("empty", None, "empty: no image files"),
    ("notes", None, "notes: no image files"),
    ("one", None, "one: one image file; a covariance"),  # was said after A had been read
    ("ckpt", 1, "--n 1: a covariance"),
    ("arc", None, "archive.json: not valid JSON"),
    ("run", None, "run is a generator checkpoint: give the number of images with --n"),
    ("run", 10, "run: not a checkpoint, nor a run folder with checkpoints"),
    ("ckpt", 10, "networks.json: format is None, expected")])
def test_a_bad_b_is_said_before_a_is_read_and_before_the_weights(bad, n, said, small_space, tmp_path, monkeypatch,
                                                                 capsys):
    """B missing, an empty folder or one without images, a damaged archive, a checkpoint without
    --n, a run without a checkpoint, a damaged checkpoint: said before A's images go through the
    network (all but the first were said after them, possibly hours later), and before the
    weights are looked for."""
    _no_weights(tmp_path, monkeypatch)
    a = _png_folder(tmp_path / "a", range(3), size=(16, 16))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    _png_folder(tmp_path / "one", range(1), size=(16, 16))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").mkdir()  # a run that has written no checkpoint yet
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "archive.json").write_text("{ damaged")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "networks.json").write_text("{}")
    read = _spy_compute(monkeypatch)
    with pytest.raises((FileNotFoundError, ValueError), match=said):  # features at hand: said before A is read
        compute_fid(str(a), str(tmp_path / bad), n, features=small_space, workers=0, progress=False)
    assert read == []
    with pytest.raises((FileNotFoundError, ValueError), match=said):  # no weights: said before they are looked for
        compute_fid(str(a), str(tmp_path / bad), n, workers=0, progress=False)
    assert cli(["fid", str(a), str(tmp_path / bad), "-q", "--workers", "0", *(["--n", str(n)] if n else [])]) == 1
    err = capsys.readouterr().err
    assert said in err and "pt_inception" not in err, err


def test_statistics_of_another_feature_size_are_refused_before_the_images_are_read(tmp_path, monkeypatch):
    """A statistics file of 768-d features (pytorch-fid --dims 768 records no feature space) against
    images in 2048-d Inception features failed in the distance, after the images were read."""
    a = _png_folder(tmp_path / "a", range(3), size=(16, 16))
    s = FrechetStats.from_features(np.random.default_rng(0).normal(size=(40, 6)), "inception-random")
    s.save(tmp_path / "six.npz")
    read = _spy_compute(monkeypatch)
    with pytest.raises(ValueError, match=r"six.npz holds statistics of 6-d features and this command's features "
                                         r"\(inception-random\) are 2048-d"):
        compute_fid(str(a), str(tmp_path / "six.npz"), random_weights=True, workers=0, progress=False, device="cpu")
    assert read == []


def test_one_kept_feature_a_side_is_refused_for_kid_and_bootstrap_before_reading(small_space, tmp_path, monkeypatch):
    """--keep-features 1 --bootstrap: each resample's covariance was NaN and eigh failed with a
    LinAlgError after both sides were read."""
    a = _png_folder(tmp_path / "a", range(4), size=(16, 16))
    b = _png_folder(tmp_path / "b", range(4, 8), size=(16, 16))
    read = _spy_compute(monkeypatch)
    for what in (dict(bootstrap=3), dict(kid_subsets=3)):
        with pytest.raises(ValueError, match="--keep-features 1: KID and bootstrap intervals need at least 2"):
            compute_fid(str(a), str(b), keep_features=1, features=small_space, workers=0, progress=False,
                        device="cpu", **what)
    assert read == []


def test_b_failing_after_a_was_read_keeps_a_statistics_for_the_rerun(small_space, tmp_path, monkeypatch, capsys):
    """A's moments (hours of features for 100k images) were lost when B failed after them: they are
    kept in a statistics file (--save-stats, else in the current folder), the error says how to
    rerun with it, and the rerun gives the FID of the whole computation."""
    from xrayforge.fid import compute as fid_compute
    a = _png_folder(tmp_path / "a", range(3), size=(16, 16))
    b = tmp_path / "b"
    b.mkdir()
    for name in ("broken.png", "broken2.png"):  # candidates, unreadable when read (one alone is refused up front)
        (b / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where a file goes that cannot go where asked
    opts = ["--features", small_space, "-q", "--workers", "0", "--device", "cpu"]
    assert cli(["fid", str(a), str(b), *opts]) == 1
    err = capsys.readouterr().err
    kept = list(work.glob("fid-stats-a-*.npz"))
    assert len(kept) == 1, list(work.iterdir())
    assert f"{b}: 0 readable image(s) (2 skipped)" in err
    assert f"{a}'s statistics were saved to {kept[0].name}: run `xrayforge fid {kept[0].name} {b}` with the same " \
           f"options" in err and len(err.strip().splitlines()) == 1, err
    assert FrechetStats.load(kept[0]).n == 3
    # the API keeps nothing unless asked, and its note says the same
    kw = dict(features=small_space, workers=0, progress=False, device="cpu")
    with pytest.raises(ValueError, match="0 readable image") as info:
        compute_fid(str(a), str(b), **kw)
    assert not getattr(info.value, "__notes__", None)
    with pytest.raises(ValueError, match="0 readable image") as info:
        compute_fid(str(a), str(b), keep_a_dir=tmp_path / "keep", **kw)  # no such folder: the temporary one
    assert info.value.__notes__ == [f"{a}'s statistics were saved to {tmp / kept[0].name}: run `xrayforge fid "
                                    f"{tmp / kept[0].name} {b}` with the same options to skip computing them again"]
    # B repaired: the kept statistics give the FID of the whole computation
    _png_folder(b / "now", range(20, 24), size=(16, 16))
    whole = compute_fid(str(a), str(b), **kw)
    again = compute_fid(str(kept[0]), str(b), **kw)
    assert again["fid"] == pytest.approx(whole["fid"], rel=1e-12, abs=1e-12) and again["n_a"] == whole["n_a"] == 3
    assert cli(["fid", kept[0].name, str(b), *opts, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(whole["fid"], rel=1e-12, abs=1e-12)
    # Ctrl-C while B is read: the same file again (replaced, not a second one), said with the interruption
    read_radiograph = fid_compute.read_radiograph

    def interrupted(path):
        if str(path).startswith(str(b)):
            raise KeyboardInterrupt
        return read_radiograph(path)
    monkeypatch.setattr(fid_compute, "read_radiograph", interrupted)
    assert cli(["fid", str(a), str(b), *opts]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"saved to {kept[0].name}" in err and list(work.glob("*.npz")) == kept
    # with --save-stats, that file is the one named; nothing else is written
    assert cli(["fid", str(a), str(b), *opts, "--save-stats", "s.npz"]) == 130
    assert "statistics were saved to s.npz: run `xrayforge fid s.npz" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == sorted([kept[0].name, "s.npz"])
    # run from inside an input: not written into it, but into the temporary folder
    monkeypatch.chdir(a)
    assert cli(["fid", ".", str(b), *opts]) == 130
    err = capsys.readouterr().err
    assert f"saved to {tmp}{os.sep}fid-stats-a-" in err and not list(a.glob("*.npz"))


_FEW_FILES = r"""
import json, resource, sys
from xrayforge.fid.compute import FeatureExtractor
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
ex = FeatureExtractor(features=sys.argv[2], device="cpu", workers=1, batch_size=400, progress=False)
kind, total, batches = ex.image_batches(sys.argv[1])
names, skipped = [], []
for images, got, skips in batches:
    names += got
    skipped += [f for f, _ in skips]
    assert images is None or len(images) == len(got)
r = ex.from_folder(sys.argv[1])
print(json.dumps({"names": names, "skipped": skipped, "mu": r.stats.mu.tolist(), "n": r.stats.n}))
"""


def test_the_decode_workers_pass_a_batch_in_few_files_and_every_image_once(small_space, tmp_path):
    """Each tensor a decode worker returns holds an open file until the main process takes it: one
    per image made batch × workers × 2 prefetched files (--batch 512 with 2 workers passed the usual
    limit of 1024: "Too many open files"). Under a limit of 256, batches of 400 images (one of
    mixed sizes, a few unreadable files) are read, each image once, with the moments of a reading
    without workers."""
    import subprocess
    import sys
    from xrayforge.fid.compute import FeatureExtractor
    folder = tmp_path / "imgs"
    _png_folder(folder, range(900), size=(12, 12))
    for i in range(0, 900, 97):
        Image.fromarray(np.full((10, 14), i % 256, np.uint8)).save(folder / f"{i:04d}.png")  # another size
    for i in (5, 450, 899):
        (folder / f"bad{i}.png").write_bytes(b"not a png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _FEW_FILES, str(folder), small_space], capture_output=True,
                         text=True, env=env, timeout=90)  # the old way could hang
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    files = sorted(str(p) for p in folder.iterdir())
    assert sorted(got["names"] + got["skipped"]) == files and len(got["skipped"]) == 3
    alone = FeatureExtractor(features=small_space, device="cpu", workers=0, batch_size=400, progress=False)
    ref = alone.from_folder(str(folder)).stats
    assert got["n"] == ref.n == len(files) - 3
    np.testing.assert_allclose(got["mu"], ref.mu, rtol=1e-12, atol=1e-12)


def test_a_file_reached_by_two_links_in_a_folder_counts_once(small_space, tmp_path):
    """A folder gathered by links, two of which reach one file, counted that image twice: it
    weighed double in the moments. It is read once; the other link is listed as skipped."""
    a = _png_folder(tmp_path / "a", range(4), size=(16, 16))
    b = _png_folder(tmp_path / "b", range(20, 25), size=(16, 16))
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in sorted(a.iterdir()):
        (linked / f.name).symlink_to(f)
    (linked / "again.png").symlink_to(a / "img000.png")
    kw = dict(features=small_space, workers=0, progress=False, device="cpu")
    plain, through_links = compute_fid(str(a), str(b), **kw), compute_fid(str(linked), str(b), **kw)
    assert through_links["n_a"] == plain["n_a"] == 4
    assert through_links["fid"] == pytest.approx(plain["fid"], rel=1e-12)
    # the first found (in sorted order) is read
    assert [s["file"] for s in through_links["skipped"]] == [str(linked / "img000.png")]
    assert str(linked / "again.png") in through_links["skipped"][0]["reason"]
    # a link to an unreadable file: the file's own reason is kept beside the link's
    (a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)
    (a / "a-link.png").symlink_to(a / "broken.png")
    r = compute_fid(str(a), str(b), **kw)
    assert sorted((s["file"], "a link" in s["reason"]) for s in r["skipped"]) == \
        [(str(a / "a-link.png"), False), (str(a / "broken.png"), True)]


def test_cli_fid_of_two_stats_files_refuses_options_that_ask_for_another_space_or_mode(small_space, tmp_path,
                                                                                        monkeypatch, capsys):
    """`fid A.npz B.npz` with --features junk, --features classifier:MISSING, --random-weights or
    --mode fast printed the plain FID (exit 0; "fast mode" for files that record none), and --prdc
    was said as "KID and bootstrap intervals need images". Options that ask for the space or mode
    the files record are accepted, still without weights."""
    from xrayforge.fid.features import feature_space
    _no_weights(tmp_path, monkeypatch)
    sa, sb, pa, pb = _two_stats_files(tmp_path)
    plain = f"FID {frechet_distance(sa, sb):.4f}"

    def run(*args, files=(pa, pb)):
        rc = cli(["fid", *map(str, files), "-q", *args])
        out, err = capsys.readouterr()
        return rc, out + err

    for args, said in ((["--features", "junk"], "expected inception, classifier:MODEL or densenet121:FILE"),
                       (["--features", f"classifier:{tmp_path / 'nope'}"], "no classifier.json"),
                       (["--features", small_space], "asks for the feature space classifier@"),
                       (["--random-weights"], "--random-weights asks for the feature space inception-random"),
                       (["--mode", "fast"], "--mode fast: " + f"{pa} and {pb} record no mode"),
                       (["--prdc"], "KID, bootstrap intervals and --prdc need images on both sides")):
        rc, text = run(*args)
        assert rc == 1 and said in text and plain not in text and "pt_inception" not in text, (args, text)
    for args in ([], ["--features", "inception"], ["--mode", "exact"]):  # what the files are: the same FID
        rc, text = run(*args)
        assert rc == 0 and text.startswith(plain), (args, text)
    rng = np.random.default_rng(1)
    for name in ("r1.npz", "r2.npz"):  # random Inception, fast mode
        s = FrechetStats.from_features(rng.normal(size=(30, 6)), "inception-random")
        s.mode = "fast"
        s.save(tmp_path / name)
    rand = (tmp_path / "r1.npz", tmp_path / "r2.npz")
    assert run("--random-weights", "--mode", "fast", files=rand)[0] == 0
    rc, text = run("--mode", "exact", files=rand)
    assert rc == 1 and f"--mode exact: {rand[0]} holds statistics of --mode fast" in text
    space = feature_space(small_space).name
    for name in ("c1.npz", "c2.npz"):
        FrechetStats.from_features(rng.normal(size=(30, 6)), space).save(tmp_path / name)
    clf = (tmp_path / "c1.npz", tmp_path / "c2.npz")
    assert run("--features", small_space, files=clf)[0] == 0 and run(files=clf)[0] == 0
    rc, text = run("--features", "inception", files=clf)
    assert rc == 1 and f"asks for the feature space inception, and {clf[0]} and {clf[1]} hold statistics of {space}" \
        in text


def test_a_single_file_that_is_no_statistics_is_said_before_the_weights(tmp_path, monkeypatch, capsys):
    """`fid notes.txt B.npz` said the Inception weights were missing (and with them, that notes.txt
    had no readable image, after the network was built): a single file is no input."""
    _no_weights(tmp_path, monkeypatch)
    _, _, pa, _ = _two_stats_files(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "one.png")
    for name in ("notes.txt", "one.png"):
        for args in ([name, pa], [pa, name]):
            assert cli(["fid", *(str(tmp_path / x) for x in args), "-q", "--workers", "0"]) == 1
            err = capsys.readouterr().err
            assert f"{name}: a single file, not a folder of images" in err and "pt_inception" not in err, err
        # with one input, its statistics to save: said before the weights too
        assert cli(["fid", str(tmp_path / name), "--save-stats", str(tmp_path / "s.npz"), "-q", "--workers", "0"]) == 1
        err = capsys.readouterr().err
        assert f"{name}: a single file, not a folder of images" in err and "pt_inception" not in err, err


def test_nan_or_infinite_features_are_refused_naming_their_rows_and_nothing_is_added():
    """One NaN feature made the mean and covariance NaN: a NaN FID, or an eigendecomposition that
    failed without saying why."""
    from xrayforge.fid.stats import update_subsets
    x = torch.randn(10, 4, dtype=torch.float64)
    x[3, 2], x[7, 0] = float("nan"), float("-inf")
    m = StreamingMoments(4)
    m.update(x[:3])
    with pytest.raises(ValueError, match=r"for 2 of 7 images in a batch \(row 0, row 4\)"):
        m.update(x[3:])
    assert m.n == 3 and torch.isfinite(m.m2).all()
    per = [StreamingMoments(4) for _ in range(2)]
    masks = torch.zeros(2, 10, dtype=torch.bool)
    masks[0, :3] = masks[1, 8:] = True  # the bad rows in no subset: the feature network failed on them all the same
    with pytest.raises(ValueError, match=r"for 2 of 10 images in a batch \(row 3, row 7\)"):
        update_subsets(per, x, masks)
    assert [p.n for p in per] == [0, 0]


def test_nan_features_are_refused_naming_the_input_and_its_images(small_space, tmp_path, monkeypatch):
    from xrayforge.errors import UserError
    from xrayforge.fid.compute import FeatureExtractor
    a = _png_folder(tmp_path / "a", range(4), size=(16, 16))
    features = FeatureExtractor.features

    def broken(self, images):  # the network failing on the second image of the batch
        out = features(self, images)
        out[1, 5] = float("nan")
        return out

    monkeypatch.setattr(FeatureExtractor, "features", broken)
    ex = FeatureExtractor(features=small_space, workers=0, progress=False, device="cpu")
    with pytest.raises(UserError, match=rf"{a}: NaN or infinite features for 1 of 4 images in a batch \(.*img001\.png\)"):
        ex.compute(str(a))


def test_nan_features_in_fid_findings_name_the_archive_and_its_images():
    from types import SimpleNamespace

    from xrayforge.errors import UserError
    from xrayforge.evaluate.fid_findings import _stream
    ex = SimpleNamespace(dim=3, device="cpu", batch_size=4,
                         features=lambda px: torch.where(px[:, :3] == 2, float("inf"), px[:, :3].double()))
    arc = SimpleNamespace(path="real-archive", resolution=8, records=[{"source": f"img{i}.png"} for i in range(6)],
                          images=lambda pos, res: np.array([[float(p)] * 3 for p in pos]))
    labels = np.zeros((6, 2), np.uint8)
    with pytest.raises(UserError, match=r"real-archive: NaN or infinite features for 1 of 4 images .*\(img2\.png\)"):
        _stream(ex, arc, np.arange(6), labels, set(), "x", False)


def test_frechet_distance_refuses_statistics_with_nan_naming_which():
    rng = np.random.default_rng(3)
    a = FrechetStats.from_features(rng.standard_normal((30, 5)))
    bad = FrechetStats(a.mu.copy(), a.sigma.copy(), 30)
    bad.mu[1] = np.nan  # gave a NaN distance
    with pytest.raises(ValueError, match="the second statistics: 1 value.s. of mu are NaN or infinite"):
        frechet_distance(a, bad, "cpu")
    bad = FrechetStats(a.mu.copy(), a.sigma.copy(), 30)
    bad.sigma[0, 0] = np.inf  # made eigh fail: "the algorithm failed to converge"
    with pytest.raises(ValueError, match="the first statistics: 1 value.s. of sigma are NaN or infinite"):
        frechet_distance(bad, a, "cpu")


def test_save_stats_naming_b_is_refused_and_b_is_left_as_it_was(tmp_path, capsys):
    rng = np.random.default_rng(5)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    FrechetStats.from_features(rng.normal(size=(30, 6)), "inception-random").save(a)
    FrechetStats.from_features(rng.normal(size=(20, 6)) + 1, "inception-random").save(b)
    before = b.read_bytes()
    # two statistics files, and an image folder against B's statistics (refused before any image is read)
    assert cli(["fid", str(a), str(b), "--save-stats", str(b), "-q"]) != 0
    assert "b.npz" in capsys.readouterr().err and b.read_bytes() == before
    folder = _png_folder(tmp_path / "imgs", range(3), size=(16, 16))
    with pytest.raises(UserError, match="would replace B's"):
        compute_fid(str(folder), str(b), save_stats=str(tmp_path / "." / "b.npz"), random_weights=True,
                    device="cpu", workers=0, progress=False)
    assert b.read_bytes() == before and FrechetStats.load(b).n == 20


def test_fid_findings_refuses_the_real_archive_as_synthetic(tmp_path, capsys):
    arc = tmp_path / "arc"
    assert cli(["prepare", "phantom:12", str(arc), "--resolution", "16", "-q"]) == 0
    capsys.readouterr()
    assert cli(["evaluate", "fid-findings", "--synthetic", str(arc), "--real", str(arc), "--out", str(tmp_path / "o"),
                "--random-weights", "--device", "cpu", "--batch", "4", "-q"]) != 0
    err = capsys.readouterr().err
    assert "is the real archive" in err and str(arc) in err
    assert not (tmp_path / "o").exists()  # refused before the output folder is made


def test_weights_without_batchnorm_counters_load_as_torch_loads_them(tmp_path):
    """A state dict without BatchNorm's num_batches_tracked (saved before PyTorch 0.4.1, or with them
    dropped) loads into torch's own Inception3 (pytorch-fid's loader); it was refused as 'not the FID
    Inception weights (94 missing keys ...)'."""
    sd = {k: v for k, v in load_inception(random_weights=True).state_dict().items()
          if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "w.pth")
    model = load_inception(tmp_path / "w.pth")
    for k, v in sd.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_a_scripted_or_pickled_network_is_named_for_what_it_is_not_called_damaged(tmp_path):
    """clean-fid's inception-2015-12-05.pt is a TorchScript archive, and torch.save(model) pickles a whole
    network: both are whole files that the weights-only loader refuses, not truncated ones."""
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "inception-2015-12-05.pt")
    with pytest.raises(UserError, match=r"inception-2015-12-05.pt: not the FID Inception weights: it is a TorchScript") as e:
        load_inception(tmp_path / "inception-2015-12-05.pt")
    assert "damaged" not in str(e.value)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")
    with pytest.raises(UserError, match=r"model.pth: not the FID Inception weights: .*torch.save\(model\).*pytorch-fid uses") as e:
        load_inception(tmp_path / "model.pth")
    assert "damaged" not in str(e.value)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "inception-2015-12-05.pt").read_bytes()[:300])
    with pytest.raises(UserError, match=r"cut.pth: cannot read the FID Inception weights: the file is truncated"):
        load_inception(tmp_path / "cut.pth")
    # a network that is no Inception at all is not told about torchvision's Inception
    torch.save({"module." + k: v for k, v in torch.nn.Linear(2, 2).state_dict().items()}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"other.pth: not the FID Inception weights .*unexpected keys, e.g. module") as e:
        load_inception(tmp_path / "other.pth")
    assert "torchvision" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.int8])
def test_integer_images_of_no_known_white_are_refused_not_read_as_floats(dtype):
    """torch.tensor of Python ints is int64: its levels 0..255 were taken as floats in [0, 1] (the
    network's input up to 509) without a word."""
    x = torch.full((1, 4, 4), 200).to(dtype)
    for backend in ("torch", None):
        with pytest.raises(ValueError, match=rf"images of dtype {dtype}: expected uint8"):
            preprocess(x, backend=backend)
    assert preprocess(x.to(torch.uint8), backend="torch").flatten()[0].item() == pytest.approx(200 / 255 * 2 - 1)
    assert preprocess(torch.ones(1, 4, 4, dtype=torch.bool), backend="torch").min().item() == 1.0


def test_channel_last_images_of_other_channel_counts_are_said_with_their_shape():
    """(N, H, W, 4) (RGBA) was read as (N, C, H, W): 'images must have 1 or 3 channels, got 5' (its height)."""
    for shape in ((2, 5, 5, 4), (2, 7, 6, 1)):
        with pytest.raises(ValueError, match=re.escape(f"C = 1 or 3, got shape {shape}")):
            preprocess(torch.zeros(shape, dtype=torch.uint8), backend="torch")
    for shape, out in (((1, 1, 1), (1, 1, 299, 299)), ((1, 2, 3, 3), (1, 3, 299, 299)), ((2, 1, 3, 5), (2, 1, 299, 299))):
        assert preprocess(torch.zeros(shape, dtype=torch.uint8), backend="torch").shape == out
