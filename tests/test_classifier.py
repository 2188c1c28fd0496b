import numpy as np
import pytest
import torch

from xrayforge.evaluate.metrics import auroc, patient_split, youden_threshold
from xrayforge.nn.classifier import (ChestClassifier, ClassifierAdapter, ClassifierConfig, DenseNet121, ResNet,
                                     load_classifier, load_torchvision_weights)
from xrayforge.sample.lco import optimise, target_tensors


def test_auroc_against_hand_computed_values():
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # ties count half
    assert auroc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))


def test_youden_threshold_and_patient_split():
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == pytest.approx(0.7)
    ids = ["p1", "p1", "p2", "p3", "p3", "p3"] * 20
    mask = patient_split(ids, 0.3)
    for pid in set(ids):  # a patient is never on both sides
        assert len({bool(m) for m, i in zip(mask, ids) if i == pid}) == 1


def test_torchvision_keys_and_weight_loading():
    resnet = ResNet("resnet18", 1000, in_channels=3)
    keys = set(resnet.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.weight", "fc.weight"} <= keys
    dense = DenseNet121(1000, in_channels=3)
    assert {"features.conv0.weight", "features.denseblock1.denselayer1.norm1.weight",
            "features.transition1.conv.weight", "features.norm5.running_var", "classifier.weight"} <= set(dense.state_dict())
    # ImageNet-style weights (3 channels, 1000 classes) into a 1-channel, 14-finding model
    model = ChestClassifier(ClassifierConfig(arch="resnet18", input_size=32))
    skipped = load_torchvision_weights(model, resnet.state_dict())
    assert skipped == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(model.net.conv1.weight, resnet.conv1.weight.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="do not fit"):
        load_torchvision_weights(model, dense.state_dict())


def test_save_load_round_trip(tmp_path):
    model = ChestClassifier(ClassifierConfig(arch="densenet121", input_size=32, width=8)).eval()
    model.config.thresholds = {"Mass": 0.3}
    model.save(tmp_path / "m")
    back = load_classifier(tmp_path / "m")
    x = torch.rand(2, 1, 40, 40) * 2 - 1
    torch.testing.assert_close(back(x), model(x))
    assert back.threshold("Mass") == 0.3 and back.threshold("Nodule") == 0.5
    with pytest.raises(FileNotFoundError, match="classifier.json"):
        load_classifier(tmp_path)


def test_an_adapted_foreign_classifier_drives_lco():
    """A classifier that outputs probabilities (as torchxrayvision's do), wrapped by the adapter."""
    class Brightness(torch.nn.Module):  # 'finding' = a bright image
        def forward(self, x):
            return torch.sigmoid(8 * x.mean(dim=(1, 2, 3))).unsqueeze(1)

    adapter = ClassifierAdapter(Brightness(), ["Bright"], transform=lambda x: x * 1.0, outputs="probabilities")
    G = lambda z: torch.tanh(z[:, :16].view(-1, 1, 4, 4))  # noqa: E731 (a generator: latent -> image)
    z0 = -torch.ones(4, 32)                                  # starts dark: p(bright) ≈ 0
    values, mask, thr = target_tensors({"Bright": 1}, adapter.findings, adapter.threshold)
    res = optimise(G, adapter, z0, values.expand(4, -1), mask.expand(4, -1), thr.expand(4, -1), steps=200, lr=0.1)
    assert res.accepted.all() and (res.probs[:, 0] >= 0.5).all()
    with pytest.raises(ValueError):
        ClassifierAdapter(Brightness(), ["Bright"], outputs="scores")


def test_weights_that_leave_part_of_the_body_unloaded_are_refused():
    """ResNet-18 keys all exist in a ResNet-34 (its extra blocks would stay random), and an empty
    state dict loads nothing: neither may pass as loaded weights."""
    model = ChestClassifier(ClassifierConfig(arch="resnet34", input_size=32))
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    with pytest.raises(ValueError, match="not given.*layer1.2"):
        load_torchvision_weights(model, ResNet("resnet18", 1000, in_channels=3).state_dict())
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in before.items())  # nothing half loaded
    with pytest.raises(ValueError, match="not given"):
        load_torchvision_weights(ChestClassifier(ClassifierConfig(arch="resnet18", input_size=32)), {})
    # torchvision's published files have no num_batches_tracked: not a missing weight
    r18 = {k: v for k, v in ResNet("resnet18", 1000, in_channels=3).state_dict().items()
           if not k.endswith("num_batches_tracked")}
    load_torchvision_weights(ChestClassifier(ClassifierConfig(arch="resnet18", input_size=32)), r18)


def test_chexnet_style_densenet_weights_load():
    """CheXNet's checkpoint: {"state_dict": ...} of a DataParallel ``module.densenet121.`` with
    torchvision's older layer keys (``denselayer1.norm.1.weight``) and a ``classifier.0`` Linear over
    the 14 findings in ChestX-ray14's order."""
    import re
    dense = DenseNet121(14, in_channels=3)
    for p in dense.parameters():
        p.data.normal_()
    state = {"module.densenet121." + re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k)
             .replace("classifier.", "classifier.0."): v for k, v in dense.state_dict().items()}
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in state
    model = ChestClassifier(ClassifierConfig(arch="densenet121", input_size=32))
    assert load_torchvision_weights(model, {"epoch": 3, "state_dict": state}) == []
    torch.testing.assert_close(model.net.classifier.weight, dense.classifier.weight)
    torch.testing.assert_close(model.net.features.denseblock4.denselayer16.conv2.weight,
                               dense.features.denseblock4.denselayer16.conv2.weight)
    torch.testing.assert_close(model.net.features.conv0.weight, dense.features.conv0.weight.sum(1, keepdim=True))
    # and as the --features densenet121:FILE space (which refused it: no features.conv0.weight)
    import tempfile

    from xrayforge.fid.features import feature_space
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"epoch": 3, "state_dict": state}, f"{tmp}/chexnet.pth.tar")
        space = feature_space(f"densenet121:{tmp}/chexnet.pth.tar")
    torch.testing.assert_close(space.net.features.denseblock4.denselayer16.conv2.weight,
                               dense.features.denseblock4.denselayer16.conv2.weight)


def test_init_weights_that_do_not_fit_name_the_file(tmp_path):
    from xrayforge.errors import UserError
    from xrayforge.evaluate.classifier import ClassifierTraining, LabelledImages, fit

    class Arc:  # what LabelledImages reads of an archive
        findings, path = ["Mass"], "arc"
        labels = np.array([[0], [1], [0], [1]])
        patient_ids = ["a", "b", "c", "d"]

    torch.save(ResNet("resnet18", 1000, in_channels=3).state_dict(), tmp_path / "r18.pt")
    images = LabelledImages([(Arc(), np.arange(4))])
    with pytest.raises(UserError, match=r"r18\.pt: weights do not fit the resnet50 body"):
        fit(images, [0, 1], [2, 3], ClassifierTraining(arch="resnet50", input_size=32, epochs=1, batch=2,
                                                       device="cpu"), init_weights=str(tmp_path / "r18.pt"),
            progress=False)


@pytest.mark.parametrize("settings, said", [
    ({"epochs": 0}, r"--epochs 0: training needs a whole number of epochs, at least 1"),
    ({"epochs": 2.5}, r"--epochs 2.5"),
    ({"lr": 0.0}, r"--lr 0.0: the learning rate must be a positive number"),
    ({"lr": float("nan")}, r"--lr nan"),
])
def test_training_settings_the_cli_refuses_are_refused_through_the_api(settings, said):
    """fit / train_classifier called from Python with epochs=0 failed in the LR scheduler with a bare
    ZeroDivisionError (the CLI refuses it when parsed); a NaN learning rate trained to NaN weights."""
    from xrayforge.errors import UserError
    from xrayforge.evaluate.classifier import ClassifierTraining, LabelledImages, fit

    class Arc:
        findings, path = ["Mass"], "arc"
        labels = np.array([[0], [1], [0], [1]])
        patient_ids = ["a", "b", "c", "d"]

    images = LabelledImages([(Arc(), np.arange(4))])
    cfg = ClassifierTraining(**{"input_size": 32, "width": 4, "epochs": 1, "batch": 2, "device": "cpu", **settings})
    with pytest.raises(UserError, match=said):
        fit(images, [0, 1], [2, 3], cfg, progress=False)


def test_training_settings_may_be_numpy_numbers(monkeypatch):
    """Numpy's numbers (a sweep over np.arange) are numbers: taken, and given to the LR scheduler as the
    Python numbers it requires ("Expected positive integer total_steps" for an np.int64)."""
    from xrayforge.evaluate.classifier import ClassifierTraining, LabelledImages, fit

    class Arc:
        findings, path = ["Mass"], "arc"
        labels = np.array([[0], [1], [0], [1]])
        patient_ids = ["a", "b", "c", "d"]

    class Reached(Exception):
        pass
    steps = []

    def scheduler(opt, max_lr, total_steps):
        steps.append((total_steps, max_lr))
        raise Reached  # the training itself is tested elsewhere
    monkeypatch.setattr(torch.optim.lr_scheduler, "OneCycleLR", scheduler)
    cfg = ClassifierTraining(input_size=32, width=4, epochs=np.int64(3), batch=2, lr=np.float32(0.5), device="cpu")
    with pytest.raises(Reached):
        fit(LabelledImages([(Arc(), np.arange(4))]), [0, 1], [2, 3], cfg, progress=False)
    assert steps == [(3, 0.5)] and type(steps[0][0]) is int and type(steps[0][1]) is float


def test_an_adapted_classifier_with_another_number_of_outputs_is_said():
    """A wrapped model giving 3 outputs for 2 named findings failed deep in LCO's loss with a
    broadcasting error; the adapter says what it got and what it expected."""
    adapter = ClassifierAdapter(torch.nn.Flatten(), ["Mass", "Nodule"])
    with pytest.raises(ValueError, match=r"outputs of shape \(4, 3\), where \(batch, 2\) was expected.*Mass, Nodule"):
        adapter(torch.zeros(4, 3))
    assert adapter(torch.zeros(4, 2)).shape == (4, 2)


def test_rejection_sampling_runs_the_networks_as_fixed_functions():
    """The baseline classified each batch with a caller's networks in whatever mode they were: a
    classifier left in training mode normalised by the batch's statistics (an image's call depended
    on its batch mates) and rewrote its running statistics. It runs them in eval mode now, and
    gives each module its mode back."""
    from xrayforge.sample.writer import rejection_sample

    class G(torch.nn.Module):
        config = type("Config", (), {"latent_dim": 8})

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 16)

        def forward(self, z):
            return torch.tanh(self.lin(z)).view(-1, 1, 4, 4)

    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1), torch.nn.BatchNorm1d(1))
    clf[2].running_mean.fill_(-0.3)
    adapter = ClassifierAdapter(clf, ["Bright"])
    g = G()
    expected = rejection_sample(g.eval(), adapter.eval(), {"Bright": 1}, seed=3, n=40, batch=40, keep_images=True)
    assert 0 < expected["accepted"] < 40  # the test would show nothing otherwise
    running = clf[2].running_mean.clone()
    got = rejection_sample(g.train(), adapter.train(), {"Bright": 1}, seed=3, n=40, batch=7, keep_images=True)
    assert got["accepted"] == expected["accepted"] and torch.equal(got["images"], expected["images"])
    assert torch.equal(clf[2].running_mean, running) and clf[2].training and g.training


@pytest.mark.parametrize("edit, said", [
    ({"thresholds": {"mass": 0.3}}, r"thresholds for findings the classifier does not have: \['mass'\]"),
    ({"thresholds": {"Mass": "0.3"}}, r"the threshold of Mass is '0.3', not a number"),
    ({"thresholds": [0.3]}, r"thresholds must map findings"),
    ({"thresholds": {"Mass": 30}}, r"the threshold of Mass is 30, not a probability between 0 and 1"),
    ({"thresholds": {"Mass": -0.1}}, r"the threshold of Mass is -0.1, not a probability"),
    ({"input_size": "32"}, r"input_size '32' is not a positive whole number"),
    ({"input_size": 0}, r"input_size 0 is not a positive whole number"),
])
def test_a_hand_edited_classifier_json_is_refused_when_loaded(tmp_path, edit, said):
    """classifier.json edited by hand (a threshold tuned for LCO): a misspelt finding's threshold was
    silently 0.5 (ClassifierAdapter refuses it), a threshold or input size given as text loaded and
    failed at the first image with a TypeError or ValueError that named no file."""
    import json
    from xrayforge.errors import UserError
    model = ChestClassifier(ClassifierConfig(input_size=32, width=4))
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "classifier.json").read_text())
    (tmp_path / "m" / "classifier.json").write_text(json.dumps({**meta, **edit}))
    with pytest.raises(UserError, match=r"m/classifier.json: damaged classifier settings \(" + said):
        load_classifier(tmp_path / "m")


def test_weights_of_another_width_are_said_to_be_of_another_shape():
    """Weights of a --width 4 ResNet-18 given to a --width 8 one: every key was listed both as 'not
    used' and as 'not given' (conv1.weight among both), which says nothing of the cause."""
    small = ResNet("resnet18", 14, in_channels=1, width=4).state_dict()
    with pytest.raises(ValueError, match=r"of another shape, e.g. \['conv1.weight \(4, 1, 7, 7\) where the "
                                         r"resnet18 has \(8, 1, 7, 7\)'") as info:
        load_torchvision_weights(ChestClassifier(ClassifierConfig(input_size=32, width=8)), small)
    assert "not used" not in str(info.value) and "not given" not in str(info.value)


def test_findings_given_as_one_string_are_refused_naming_the_field(tmp_path):
    """findings "Atelectasis" (one name, not a list of one) made a classifier of 11 findings 'A', 't',
    'e', ...: ClassifierConfig built it, and a classifier.json so edited was said to have weights of
    the wrong shape."""
    import json
    from xrayforge.errors import UserError
    with pytest.raises(UserError, match=r"findings must be a list of finding names, not the one string "
                                        r"'Atelectasis' \(one finding is \['Atelectasis'\]\)"):
        ClassifierConfig(findings="Atelectasis")
    with pytest.raises(UserError, match=r"findings must be a list of finding names, got \[1, 2\]"):
        ClassifierConfig(findings=[1, 2])
    with pytest.raises(UserError, match=r"ClassifierAdapter: findings must be a list of finding names"):
        ClassifierAdapter(torch.nn.Identity(), "Mass")
    assert ClassifierConfig(findings=("Mass",)).findings == ("Mass",)
    model = ChestClassifier(ClassifierConfig(input_size=32, width=4, findings=["Atelectasis"]))
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "classifier.json").read_text())
    (tmp_path / "m" / "classifier.json").write_text(json.dumps({**meta, "findings": "Atelectasis"}))
    with pytest.raises(UserError, match=r"m/classifier.json: damaged classifier settings \(findings must be a list "
                                        r"of finding names, not the one string 'Atelectasis'"):
        load_classifier(tmp_path / "m")


def test_classify_train_says_which_findings_have_no_validation_auroc(tmp_path, capsys):
    """A finding that no validation image has (or every one has) has no AUROC and keeps the default
    threshold 0.5: `classify train` left it out of its list unsaid, and where no finding had an AUROC
    it printed 'best mean validation AUROC nan' with no reason."""
    import json
    from xrayforge.cli import main as cli
    from xrayforge.data.prepare import prepare
    prepare("phantom:30", tmp_path / "data", resolution=16, workers=1, progress=False)
    common = ["--input-size", "16", "--width", "4", "--epochs", "1", "--batch", "4", "--device", "cpu", "-q"]
    assert cli(["classify", "train", str(tmp_path / "data"), "--out", str(tmp_path / "one"), "--val-fraction", "0.05",
                *common]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    assert "no validation AUROC: no finding is both present and absent among the 1 images of 1 patients" in out
    assert "every decision threshold is the default 0.5" in out
    summary = json.loads((tmp_path / "one" / "training.json").read_text())
    absent = [f for f, n in summary["val_positives"].items() if n == 0]
    present = [f for f, n in summary["val_positives"].items() if n == 1]
    assert len(absent) + len(present) == 14 and present and "Atelectasis" in absent
    assert f"AUROC undefined (no validation image has it; decision threshold 0.5): {', '.join(absent)}" in out
    assert f"AUROC undefined (every validation image has it; decision threshold 0.5): {', '.join(present)}" in out
    # with validation AUROCs: the findings without one are named beside them
    assert cli(["classify", "train", str(tmp_path / "data"), "--out", str(tmp_path / "two"), "--val-fraction", "0.3",
                *common]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "two" / "training.json").read_text())
    kept = summary["history"][-1]["auroc"]
    assert kept and "best mean validation AUROC" in out
    missing = [f for f in summary["val_positives"] if f not in kept]
    assert missing and all(f in out for f in missing) and "Atelectasis" in missing
