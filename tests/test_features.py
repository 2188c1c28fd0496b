"""Feature spaces (--features): Fréchet distances in a DenseNet-121 or classifier space equal the
same computation done by hand with the loaded network; the space is recorded in statistics
files and JSON, and different spaces are never compared."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xrayforge.cli import main as cli
from xrayforge.data.archive import Archive
from xrayforge.data.prepare import prepare
from xrayforge.errors import UserError
from xrayforge.fid.compute import compute_fid
from xrayforge.fid.features import feature_space
from xrayforge.fid.prdc import prdc
from xrayforge.fid.stats import FrechetStats, frechet_distance
from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig, DenseNet121


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("features")
    prepare("phantom:30", w / "a", resolution=32, workers=1, progress=False)
    prepare("phantom:24", w / "b", resolution=16, workers=1, progress=False)
    torch.manual_seed(0)
    net = DenseNet121(num_classes=18, in_channels=1)
    for m in net.modules():  # random running statistics: a network that is not the identity in eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), w / "dn.pt")
    ChestClassifier(ClassifierConfig(input_size=32, width=8)).save(w / "clf")
    return w


def _unit(arc):
    x = torch.from_numpy(arc.as_float(arc.images(np.arange(len(arc)), arc.resolution)))
    return x[:, None]


def _stats(f):
    f = f.double().numpy()
    return FrechetStats(f.mean(0), np.cov(f, rowvar=False), len(f))


def test_densenet_distance_equals_the_computation_by_hand(world):
    net = DenseNet121(num_classes=18, in_channels=1)
    net.load_state_dict(torch.load(world / "dn.pt", weights_only=True))
    net.eval()

    def by_hand(arc):
        x = F.interpolate(_unit(arc), size=(224, 224), mode="bilinear", align_corners=False,
                          antialias=arc.resolution > 224)
        x = (2 * x - 1) * 1024  # torchxrayvision's range
        with torch.no_grad():
            return F.adaptive_avg_pool2d(F.relu(net.features(x)), 1).flatten(1)

    fa, fb = by_hand(Archive(world / "a")), by_hand(Archive(world / "b"))
    want = frechet_distance(_stats(fa), _stats(fb))
    got = compute_fid(str(world / "a"), str(world / "b"), features=f"densenet121:{world / 'dn.pt'}", workers=0,
                      progress=False, prdc=True)
    assert got["fid"] == pytest.approx(want, rel=1e-6) and want > 0
    assert got["features"].startswith("densenet121@") and got["n_a"] == 30
    theirs = prdc(fa, fb)
    for key in ("precision", "recall", "density", "coverage"):
        assert got[key] == pytest.approx(theirs[key]), key


def test_densenet_input_of_a_tall_image_is_antialiased_like_a_wide_one(world):
    """Antialiasing went by the width alone: a 300 x 100 image's height was shrunk to 224 without it,
    while the same image turned on its side was antialiased."""
    space = feature_space(f"densenet121:{world / 'dn.pt'}")
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (300, 100), dtype=np.uint8))
    x = img.float()[None, None] / 255
    want = (2 * F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True) - 1) * 1024
    torch.testing.assert_close(space.inputs(img[None]), want)
    torch.testing.assert_close(space.inputs(img.T[None]), want.transpose(-1, -2), rtol=0, atol=1e-3)


def test_classifier_space_is_its_penultimate_layer(world):
    from xrayforge.nn.classifier import load_classifier
    model = load_classifier(world / "clf")
    space = feature_space(f"classifier:{world / 'clf'}")
    arc = Archive(world / "b")
    x = _unit(arc)
    with torch.no_grad():
        inp = (F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) - 0.5) / 0.25
        n = model.net
        h = F.max_pool2d(F.relu(n.bn1(n.conv1(inp))), 3, 2, 1)
        want = F.adaptive_avg_pool2d(n.layer4(n.layer3(n.layer2(n.layer1(h)))), 1).flatten(1)
    torch.testing.assert_close(space(torch.from_numpy(arc.images(np.arange(len(arc)), 16))), want)
    assert space.dim == want.shape[1] == 64 and space.name.startswith("classifier@")


def test_the_space_is_recorded_and_different_spaces_are_refused(world, tmp_path, capsys):
    clf = f"classifier:{world / 'clf'}"
    assert cli(["fid", str(world / "a"), "--features", clf, "--save-stats", str(tmp_path / "a.npz"), "-q",
                "--workers", "0"]) == 0
    saved = FrechetStats.load(tmp_path / "a.npz")
    assert saved.space.startswith("classifier@")
    capsys.readouterr()
    assert cli(["fid", str(tmp_path / "a.npz"), str(world / "b"), "--features", clf, "--json", "-q",
                "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["features"] == saved.space
    # the same statistics against Inception features, or against another space's file: refused
    assert cli(["fid", str(tmp_path / "a.npz"), str(world / "b"), "--random-weights", "-q", "--workers", "0"]) == 1
    assert "feature space" in capsys.readouterr().err
    FrechetStats(saved.mu, saved.sigma, saved.n).save(tmp_path / "inception.npz")  # no name: Inception's
    assert cli(["fid", str(tmp_path / "a.npz"), str(tmp_path / "inception.npz")]) == 1
    assert "a distance between different feature spaces means nothing" in capsys.readouterr().err
    with pytest.raises(UserError, match="feature space"):
        frechet_distance(saved, FrechetStats(saved.mu, saved.sigma, saved.n, "densenet121@0"))


@pytest.mark.parametrize("spec,match", [("resnet", "expected inception"), ("classifier:", "expected inception"),
                                        ("classifier:/nowhere", "classifier.json"),
                                        ("densenet121:/nowhere.pt", "not found")])
def test_bad_feature_spaces(spec, match):
    with pytest.raises((UserError, FileNotFoundError), match=match):
        feature_space(spec)


def test_random_weights_only_for_inception(world):
    with pytest.raises(UserError, match="random-weights"):
        feature_space(f"classifier:{world / 'clf'}", random_weights=True)


def test_a_state_dict_that_is_not_a_densenet(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "r.pt")
    with pytest.raises(UserError, match="features.conv0.weight"):
        feature_space(f"densenet121:{tmp_path / 'r.pt'}")


@pytest.mark.parametrize("space", ["inception", "densenet", "classifier"])
def test_images_of_different_sizes_go_through_the_network_together(world, tmp_path, space):
    """A folder of mixed sizes (CheXpert's, MIMIC's): each image is made the network's input alone,
    then the batch goes through the network once (it went image by image: a batch of 1 per image),
    with the features each image has alone."""
    from PIL import Image
    from xrayforge.evaluate.memorisation import collect
    from xrayforge.fid.compute import FeatureExtractor
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w), dtype=np.uint8) for h, w in ((40, 32), (32, 32), (64, 48), (40, 32), (33, 35))]
    for k, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{k}.png")
    spec = {"inception": None, "densenet": f"densenet121:{world / 'dn.pt'}",
            "classifier": f"classifier:{world / 'clf'}"}[space]
    ex = FeatureExtractor(random_weights=space == "inception", features=spec, device="cpu", batch_size=8, workers=0,
                          progress=False)
    calls = []
    embed = ex.space.embed
    ex.space.embed = lambda x: calls.append(len(x)) or embed(x)
    got = ex.from_folder(str(tmp_path)).stats
    alone = torch.cat([embed(ex.space.inputs(torch.from_numpy(img)[None])) for img in images]).double()
    assert calls == [5] and got.n == 5
    np.testing.assert_allclose(got.mu, alone.mean(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.sigma, np.cov(alone.numpy(), rowvar=False), rtol=1e-3, atol=1e-6)
    if space == "inception":  # the memorisation audit reads the same batches
        names, feats, pix, thumbs = collect(ex, str(tmp_path), progress=False)
        assert len(names) == len(feats) == len(pix) == len(thumbs) == 5 and thumbs.shape[1:] == (64, 64)


def _precisions():
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("user", [("tf32", "tf32"), ("ieee", "none")], ids=["tf32", "set-by-user"])
def test_exact_inception_runs_in_ieee_float32_not_tf32(mode, user, monkeypatch):
    """PyTorch lets cuDNN run float32 convolutions as TF32 by default (1e-3 relative per layer on
    Ampere and later GPUs): exact mode turns that off around Inception and puts the settings back
    as they were; fast mode (bf16) leaves them. Through PyTorch's fp32_precision settings: after a
    user set those, reading the legacy allow_tf32 flags raises."""
    from xrayforge.fid.features import InceptionSpace, conv_tf32_allowed
    space = InceptionSpace(random_weights=True, mode=mode)
    seen = []
    monkeypatch.setattr(space, "model", lambda x: seen.append(_precisions()) or torch.zeros(len(x), 2048))
    before = _precisions()
    try:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = user
        assert conv_tf32_allowed() == (user[0] == "tf32")
        space.embed(torch.zeros(2, 1, 299, 299))
        after = _precisions()
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before
    assert seen == [("ieee", "ieee") if mode == "exact" else user]
    assert after == user


@pytest.mark.parametrize("space", ["classifier", "densenet121"])
def test_the_classifier_and_densenet_spaces_run_in_ieee_float32(space, tmp_path, monkeypatch):
    """Their one mode ran as PyTorch's settings said: TF32 convolutions on GPUs by default, a GPU's
    features and FID about 1e-3 relative per layer from a CPU's. They now run in IEEE float32, as
    Inception's exact mode, and leave the user's settings as they were."""
    from xrayforge.fid.features import feature_space
    from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig, DenseNet121
    if space == "classifier":
        ChestClassifier(ClassifierConfig(input_size=32, width=8)).save(tmp_path / "clf")
        fs = feature_space(f"classifier:{tmp_path / 'clf'}")
        net = fs.model.net
    else:
        torch.save(DenseNet121(num_classes=1, in_channels=1).state_dict(), tmp_path / "d.pt")
        fs = feature_space(f"densenet121:{tmp_path / 'd.pt'}")
        net = fs.net
    seen = []
    monkeypatch.setattr(net, "embed", lambda x: seen.append(_precisions()) or torch.zeros(len(x), fs.dim))
    before = _precisions()
    try:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "tf32", "tf32"
        fs.embed(torch.zeros(2, 1, 32, 32))
        after = _precisions()
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before
    assert seen == [("ieee", "ieee")] and after == ("tf32", "tf32")


def test_fast_mode_asked_of_another_space_is_refused(tmp_path):
    """--mode fast with --features classifier:MODEL was ignored without a word: the space has one mode."""
    from xrayforge.errors import UserError
    from xrayforge.fid.features import feature_space
    from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig
    ChestClassifier(ClassifierConfig(input_size=32, width=8)).save(tmp_path / "clf")
    with pytest.raises(UserError, match=r"--mode fast \(bf16\) is Inception's; --features classifier:.* has one mode"):
        feature_space(f"classifier:{tmp_path / 'clf'}", mode="fast")
    assert feature_space(f"classifier:{tmp_path / 'clf'}", mode="exact").dim > 0


def test_grey_levels_of_images_with_other_channel_counts_are_refused_with_their_shape():
    """unit_grey (the classifier and DenseNet spaces' input) passed an (N, H, W, 4) image on as grey levels
    of 'N images of H channels', which failed deep in the network, or not at all."""
    from xrayforge.fid.features import unit_grey
    with pytest.raises(ValueError, match=r"C = 1 or 3, got shape \(2, 5, 6, 4\)"):
        unit_grey(torch.zeros(2, 5, 6, 4, dtype=torch.uint8), "cpu")
    with pytest.raises(ValueError, match=r"images of dtype torch.int64"):
        unit_grey(torch.zeros(2, 5, 6, dtype=torch.int64), "cpu")
    assert unit_grey(torch.full((2, 5, 6, 3), 255, dtype=torch.uint8), "cpu").shape == (2, 1, 5, 6)


def test_a_whole_saved_densenet_is_named_for_what_it_is_not_called_damaged(tmp_path):
    """torch.save(model) of a torchxrayvision DenseNet (not its state_dict()) was 'truncated or damaged'."""
    torch.save(torch.nn.Linear(2, 2), tmp_path / "xrv.pt")
    with pytest.raises(UserError, match=r"xrv.pt: not a DenseNet-121 state dict: .*torch.save\(model\).*"
                                        r"save the model's state_dict\(\)") as e:
        feature_space(f"densenet121:{tmp_path / 'xrv.pt'}")
    assert "damaged" not in str(e.value)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "xrv.ts")
    with pytest.raises(UserError, match=r"xrv.ts: not a DenseNet-121 state dict: it is a TorchScript archive"):
        feature_space(f"densenet121:{tmp_path / 'xrv.ts'}")


def test_inception_weights_given_with_another_space_are_refused_not_ignored(world, tmp_path, capsys):
    """--inception W with --features classifier:MODEL was ignored without a word (--random-weights and
    --mode fast are refused there)."""
    with pytest.raises(UserError, match=r"--inception w.pth gives the FID Inception's weights; it does not apply to "
                                        r"--features classifier:"):
        feature_space(f"classifier:{world / 'clf'}", inception="w.pth")
    rc = cli(["fid", str(world / "a"), str(world / "b"), "--features", f"classifier:{world / 'clf'}",
              "--inception", str(tmp_path / "w.pth"), "-q"])
    assert rc == 1 and "does not apply to --features classifier:" in capsys.readouterr().err
