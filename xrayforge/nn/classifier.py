"""Multi-label chest radiograph classifiers: ResNet and DenseNet-121 with torchvision's
state-dict keys (so weights a user has, e.g. ImageNet or CheXNet-style DenseNet-121, load:
``load_torchvision_weights``),
saved as weights (``weights_only``) + JSON like the GAN checkpoints, and an adapter for any
other classifier. Lives in ``nn`` because sampling (LCO) needs it; training is in
``xrayforge.evaluate.classifier``.

Every classifier here is called on generator-style input: (N, 1, R, R) in [-1, 1]; it resizes
to its input size and applies its own normalisation, and returns per-finding logits.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..utils.files import atomic_write, load_state, load_torch, read_json, write_text_atomic
import torch.nn as nn
import torch.nn.functional as F

from ..data.labels import FINDINGS


# --------------------------------------------------------------------------- ResNet (torchvision keys)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
           "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    def __init__(self, arch: str, num_classes: int, in_channels: int = 1, width: int = 64):
        super().__init__()
        block, layers = RESNETS[arch]
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._layer(block, width, layers[0], 1)
        self.layer2 = self._layer(block, width * 2, layers[1], 2)
        self.layer3 = self._layer(block, width * 4, layers[2], 2)
        self.layer4 = self._layer(block, width * 8, layers[3], 2)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _layer(self, block, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def embed(self, x):
        """The globally pooled features before the final layer."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        return self.fc(self.embed(x))


# --------------------------------------------------------------------------- DenseNet-121 (torchvision keys)
class _DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n, cin, growth, bn_size):
        super().__init__({f"denselayer{i + 1}": _DenseLayer(cin + i * growth, growth, bn_size) for i in range(n)})

    def forward(self, x):
        feats = [x]
        for layer in self.values():
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet121(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, growth: int = 32, init_features: int = 64,
                 blocks=(6, 12, 24, 16), bn_size: int = 4):
        super().__init__()
        feats = nn.Sequential()
        feats.add_module("conv0", nn.Conv2d(in_channels, init_features, 7, 2, 3, bias=False))
        feats.add_module("norm0", nn.BatchNorm2d(init_features))
        feats.add_module("relu0", nn.ReLU())
        feats.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        c = init_features
        for i, n in enumerate(blocks):
            feats.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                feats.add_module(f"transition{i + 1}", _Transition(c, c // 2))
                c //= 2
        feats.add_module("norm5", nn.BatchNorm2d(c))
        self.features = feats
        self.classifier = nn.Linear(c, num_classes)

    def embed(self, x):
        """The globally pooled features before the classifier (torchxrayvision's ``features2``)."""
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1)

    def forward(self, x):
        return self.classifier(self.embed(x))


# --------------------------------------------------------------------------- the classifier object
@dataclass
class ClassifierConfig:
    arch: str = "resnet18"
    input_size: int = 256
    width: int = 64                 # ResNet base width (64 = torchvision); DenseNet growth rate = width // 2
    findings: list = field(default_factory=lambda: list(FINDINGS))
    mean: float = 0.5               # normalisation of [0, 1] pixels before the network
    std: float = 0.25
    thresholds: dict = field(default_factory=dict)  # per-finding decision thresholds (default 0.5)

    def __post_init__(self):
        _check_findings(self.findings)


def _check_findings(findings, who: str = "", names_only: bool = True) -> None:
    """``findings`` a list of names: one name given as a string was taken letter by letter (a
    classifier of 11 findings 'A', 't', 'e', ... for "Atelectasis"). ``names_only``: a list or
    tuple of strings, as classifier.json holds them (else any other sequence)."""
    if isinstance(findings, (str, bytes)):
        raise UserError(f"{who}{': ' if who else ''}findings must be a list of finding names, not the one string "
                        f"{findings!r} (one finding is [{findings!r}])")
    if names_only and (not isinstance(findings, (list, tuple)) or not all(isinstance(f, str) for f in findings)):
        raise UserError(f"{who}{': ' if who else ''}findings must be a list of finding names, got {findings!r}")


def resize_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """The classifiers' resize of (N, C, H, W) to size × size: bilinear, antialiased when shrinking."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


def build_network(cfg: ClassifierConfig) -> nn.Module:
    n = len(cfg.findings)
    if cfg.arch in RESNETS:
        return ResNet(cfg.arch, n, 1, cfg.width)
    if cfg.arch == "densenet121":
        return DenseNet121(n, 1, growth=max(cfg.width // 2, 1), init_features=cfg.width)
    raise ValueError(f"unknown classifier architecture {cfg.arch!r}; choose {sorted(RESNETS) + ['densenet121']}")


class ChestClassifier(nn.Module):
    """(N, 1, R, R) in [-1, 1] -> (N, len(findings)) logits."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        self.findings = list(self.config.findings)
        self.net = build_network(self.config)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_input((images.float() + 1) / 2, self.config.input_size)
        return (x - self.config.mean) / self.config.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self._input(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, R, R) in [-1, 1] -> the penultimate features (N, D): a radiograph-aware feature
        space for the distances (``--features classifier:MODEL``)."""
        return self.net.embed(self._input(images))

    def threshold(self, finding: str) -> float:
        return float(self.config.thresholds.get(finding, 0.5))

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        atomic_write(folder / "classifier.pt", lambda p: torch.save(state, p))
        write_text_atomic(folder / "classifier.json", json.dumps({"format": "xrayforge-classifier", "version": 1,
                                                                  **asdict(self.config)}, indent=2))
        return folder


def _check_settings(cfg: ClassifierConfig) -> None:
    """What the weights cannot tell of a classifier.json (e.g. edited by hand): else an input size of
    "256" failed in the first forward pass, and a threshold of a misspelt finding was silently 0.5."""
    if not isinstance(cfg.input_size, int) or isinstance(cfg.input_size, bool) or cfg.input_size < 1:
        raise ValueError(f"input_size {cfg.input_size!r} is not a positive whole number")
    check_thresholds(cfg.thresholds, cfg.findings)


def check_thresholds(thresholds, findings) -> None:
    """Per-finding decision thresholds: probabilities, of findings the classifier has (else a
    misspelt finding's threshold would silently be the default 0.5)."""
    if not isinstance(thresholds, dict):
        raise ValueError(f"thresholds must map findings to probabilities, not {type(thresholds).__name__}")
    unknown = sorted(set(thresholds) - set(findings))
    if unknown:
        raise ValueError(f"thresholds for findings the classifier does not have: {unknown}; "
                         f"its findings: {', '.join(findings)}")
    for f, t in thresholds.items():
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"the threshold of {f} is {t!r}, not a number")
        if not 0 <= t <= 1:  # a probability: else every image (or none) was called positive, silently
            raise ValueError(f"the threshold of {f} is {t!r}, not a probability between 0 and 1")


def load_classifier(folder: str | os.PathLike, map_location="cpu") -> ChestClassifier:
    folder = Path(folder)
    meta_path = folder / "classifier.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no classifier.json (train one with `xrayforge classify train`)")
    meta = read_json(meta_path, "classifier settings")
    if meta.pop("format", None) != "xrayforge-classifier":
        raise UserError(f"{meta_path}: not an xrayforge classifier file")
    meta.pop("version", None)
    try:
        model = ChestClassifier(ClassifierConfig(**meta))
        _check_settings(model.config)
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"{meta_path}: damaged classifier settings ({exc})") from None
    state = load_torch(folder / "classifier.pt", "classifier weights", map_location=map_location)
    load_state(model.net, state, f"{folder / 'classifier.pt'}: the weights do not fit classifier.json")
    return model.eval()


def torchvision_keys(state_dict: dict) -> dict:
    """A state dict in torchvision's current key layout: a checkpoint's ``state_dict`` entry
    unwrapped, ``module.`` (DataParallel) and CheXNet's ``densenet121.`` prefixes dropped, a
    DenseNet's older layer keys (``denselayer1.norm.1.weight``, as torchvision's published files
    and CheXNet have them) renamed to ``denselayer1.norm1.weight``, and CheXNet's
    ``classifier.0.`` (a Linear in a Sequential) to ``classifier.``."""
    import re
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    out = {}
    for k, v in state_dict.items():
        k = str(k)
        while k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("densenet121."):
            k = k[len("densenet121."):]
        k = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", k)
        k = re.sub(r"^classifier\.0\.", "classifier.", k)
        out[k] = v
    return out


def load_torchvision_weights(model: ChestClassifier, state_dict: dict, strict_body: bool = True) -> list[str]:
    """Load torchvision-layout weights (e.g. ImageNet ResNet / DenseNet, or a CheXNet-style
    DenseNet-121: keys as ``torchvision_keys`` reads them) into ``model``:
    a 3-channel first convolution is summed to one channel, and a final layer of another size
    is left at its initialisation. Returns the keys that were not loaded. ``strict_body``: a
    ValueError where a weight of the body (all but the final layer) is not in ``state_dict`` or
    does not fit (e.g. ResNet-18 weights for a ResNet-34, whose extra blocks would stay random)."""
    own = model.net.state_dict()
    skipped, loaded, reshaped = [], set(), {}
    for k, v in torchvision_keys(state_dict).items():
        if k not in own or not isinstance(v, torch.Tensor):
            skipped.append(k)
            continue
        given = tuple(v.shape)
        if v.dim() == 4 and v.shape[1] == 3 and own[k].shape[1] == 1:
            v = v.sum(dim=1, keepdim=True)
        if v.shape != own[k].shape:
            skipped.append(k)
            reshaped[k] = given
            continue
        own[k] = v
        loaded.add(k)
    head = lambda k: k.startswith("fc.") or k.startswith("classifier.")  # noqa: E731
    # batch norms' step counters: torchvision's published files have none
    missing = [k for k in own if k not in loaded and k not in reshaped and not head(k)
               and not k.endswith("num_batches_tracked")]
    # a weight of another shape is said as such (another --width, say), not as both "not used" and "not given"
    wrong = [f"{k} {reshaped[k]} where the {model.config.arch} has {tuple(own[k].shape)}"
             for k in reshaped if not head(k)]
    if strict_body and (missing or any(not head(k) for k in skipped)):
        raise ValueError(f"weights do not fit the {model.config.arch} body: "
                         + "; ".join(f"{len(keys)} {what}, e.g. {keys[:3]}" for keys, what in
                                     ((wrong, "of another shape"),
                                      ([k for k in skipped if not head(k) and k not in reshaped], "not used"),
                                      (missing, "not given"))
                                     if keys))
    model.net.load_state_dict(own)
    return skipped


class ClassifierAdapter(nn.Module):
    """Wrap any classifier for LCO and evaluation.

    ``module`` maps a batch prepared by ``transform`` to per-finding outputs; ``findings``
    names them in order; ``outputs="logits"`` or ``"probabilities"`` (probabilities are
    turned into logits). Example for a torchxrayvision DenseNet the user has on disk::

        model = torch.load("densenet121-res224-all.pt", weights_only=False)   # the user's own file
        adapter = ClassifierAdapter(model, model.pathologies, outputs="probabilities",
                                    transform=lambda x: F.interpolate(x, size=224) * 1024)  # [-1,1] -> ±1024
    """

    def __init__(self, module: nn.Module, findings, transform=None, outputs: str = "logits", thresholds=None):
        super().__init__()
        if outputs not in ("logits", "probabilities"):
            raise ValueError("outputs must be 'logits' or 'probabilities'")
        _check_findings(findings, "ClassifierAdapter", names_only=False)
        self.module, self.findings, self.transform, self.outputs = module, list(findings), transform, outputs
        self.thresholds = dict(thresholds or {})
        check_thresholds(self.thresholds, self.findings)

    def forward(self, images):
        out = self.module(self.transform(images) if self.transform else images)
        if out.dim() != 2 or out.shape[1] != len(self.findings):  # else a shape error deep in LCO's loss
            raise ValueError(f"the wrapped classifier gives outputs of shape {tuple(out.shape)}, where "
                             f"(batch, {len(self.findings)}) was expected: one per finding named "
                             f"({', '.join(self.findings[:4])}{', ...' if len(self.findings) > 4 else ''})")
        if self.outputs == "probabilities":
            # in at least float32: under bf16 / fp16 autocast 1 - 1e-6 rounds to 1, and a saturated
            # probability became an infinite logit (NaN loss and gradient in LCO)
            out = torch.logit((out if out.dtype == torch.float64 else out.float()).clamp(1e-6, 1 - 1e-6))
        return out

    def threshold(self, finding: str) -> float:
        return float(self.thresholds.get(finding, 0.5))
