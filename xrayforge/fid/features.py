"""Feature spaces for every distance: which network turns an image into a feature vector.

``feature_space(spec)`` with ``spec``:

- ``inception`` (default): the FID Inception (pytorch-fid's weights, 2048-d pool features,
  299 px bilinear, [-1, 1]) — the literature's FID. Inception never saw a radiograph.
- ``classifier:MODEL``: the penultimate (globally pooled) features of a chest classifier
  trained with ``xrayforge classify train`` — a radiograph-aware space that needs no download
  (the demo uses the phantom classifier's).
- ``densenet121:FILE``: a DenseNet-121 state dict with torchvision key names (``features.*``,
  also in their older form and CheXNet's: ``nn.classifier.torchvision_keys``; the classifier
  head is ignored), 1024-d features ``relu(norm5)`` pooled over the image at
  224 px. A 1-channel network gets torchxrayvision's normalisation (grey levels scaled to
  [-1024, 1024]); a 3-channel one ImageNet's mean and standard deviation. With
  torchxrayvision's chest-X-ray weights (``densenet121-res224-all``; save its
  ``model.state_dict()`` to a file) this is the FXD-style distance of ``pytorch-fxd``.

Each space has a ``name`` that identifies it — ``inception``, ``inception-random``,
``classifier@<sha1 of its weights>``, ``densenet121@<sha1 of the file>`` — recorded in every
statistics file and JSON result; distances between statistics of different spaces are refused.
Statistics files without a name (pytorch-fid's, and this project's older ones) are Inception's.
The classifier and DenseNet spaces have one mode, IEEE float32 (as Inception's exact mode: not
the TF32 that PyTorch lets cuDNN use on Ampere and later GPUs, which would move their features by
about 1e-3 relative per layer between a GPU and a CPU).
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..utils.files import file_id, load_state
from .preprocess import _as_nchw, max_value

DEFAULT = "inception"


def unit_grey(images: torch.Tensor, device) -> torch.Tensor:
    """Stored pixels (N, H, W[, 3]) (uint8 / uint16 / int32 holding uint16 / float in [0, 1]) ->
    (N, 1, H, W) float32 grey levels in [0, 1] on ``device``."""
    x = _as_nchw(images.to(device, non_blocking=True))
    x = x.float() / max_value(images)
    return x.mean(1, keepdim=True) if x.shape[1] == 3 else x


def _fp32_switches() -> list[tuple[object, str, object]]:
    """(object, attribute, IEEE value) of the settings that let float32 convolutions and matmuls run
    as TF32: PyTorch's ``fp32_precision`` (since 2.9; reading the legacy ``allow_tf32`` flags after
    it was set raises) or, before it, the ``allow_tf32`` flags."""
    conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        return [(conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]


def conv_tf32_allowed() -> bool:
    """Whether cuDNN may run float32 convolutions as TF32 now (PyTorch's default: yes)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return bool(torch.backends.cudnn.allow_tf32)
    chain = (conv.fp32_precision, getattr(torch.backends.cudnn, "fp32_precision", "none"),
             getattr(torch.backends, "fp32_precision", "none"))  # "none": as the level above says
    return next((v for v in chain if v != "none"), "ieee") == "tf32"


@contextlib.contextmanager
def ieee_fp32():
    """IEEE float32 convolutions and matmuls inside (the previous settings back after): PyTorch's
    default lets cuDNN run float32 convolutions as TF32 (a 10-bit mantissa) on Ampere and later
    GPUs, about 1e-3 relative per layer, where exact mode promises float32 rounding. (pytorch-fid
    under that default on such a GPU is that far from its own number on a CPU.) Not thread-safe:
    the settings are global."""
    switches = _fp32_switches()
    before = [getattr(obj, name) for obj, name, _ in switches]
    try:
        for obj, name, value in switches:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(switches, before):
            setattr(obj, name, value)


class InceptionSpace:
    dim = 2048

    def __init__(self, inception: str | None = None, random_weights: bool = False, mode: str = "exact",
                 device: torch.device | str = "cpu"):
        from .inception import load_inception
        from .preprocess import preprocess
        if mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        self.device, self.mode, self._preprocess = torch.device(device), mode, preprocess
        self.name = "inception-random" if random_weights else "inception"
        self.source = "random weights: a pipeline check" if random_weights else "pt_inception-2015-12-05"
        self.model = load_inception(inception, random_weights, self.device)
        if mode == "fast":
            self.model = self.model.to(memory_format=torch.channels_last)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Stored pixels -> the network's input (N, 1, 299, 299) on the device."""
        return self._preprocess(images.to(self.device, non_blocking=True), channels=1,
                                dtype=torch.bfloat16 if self.mode == "fast" else torch.float32)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fast":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.model(x).float()
        with ieee_fp32():
            return self.model(x).float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.inputs(images))


class ClassifierSpace:
    def __init__(self, folder: str, device: torch.device | str = "cpu"):
        from ..nn.classifier import load_classifier
        self.device = torch.device(device)
        self.model = load_classifier(folder).to(self.device).eval().requires_grad_(False)
        # named by its weights and by what shapes its input (a re-trained or re-configured model is another space)
        c = self.model.config
        shape = f"{c.arch}/{c.input_size}/{c.width}/{c.mean}/{c.std}"
        weights = file_id(Path(folder) / "classifier.pt", length=40)
        self.name = f"classifier@{hashlib.sha1((weights + shape).encode()).hexdigest()[:12]}"
        self.source = f"classifier {folder} ({self.model.config.arch}, {self.model.config.input_size} px)"
        with torch.no_grad():
            self.dim = int(self.model.embed(torch.zeros(1, 1, 8, 8, device=self.device)).shape[1])

    @torch.no_grad()
    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Stored pixels -> the network's input (resized to the classifier's size, normalised)."""
        return self.model._input(unit_grey(images, self.device) * 2 - 1)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        with ieee_fp32():  # its one mode is float32 rounding, as Inception's exact mode (not TF32 on GPUs)
            return self.model.net.embed(x).float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.inputs(images))


class DenseNet121Space:
    dim = 1024
    SIZE = 224
    IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        from ..nn.classifier import DenseNet121, torchvision_keys
        from ..utils.files import load_torch
        self.device = torch.device(device)
        state = load_torch(path, "a DenseNet-121 state dict",
                           advice="save the model's state_dict() to a file (torch.save(model.state_dict(), FILE))")
        # torchvision's published files (denselayer1.norm.1.weight) and CheXNet's (module.densenet121. ...) too
        state = torchvision_keys(state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or "features.conv0.weight" not in state:
            raise UserError(f"{path}: not a DenseNet-121 state dict with torchvision key names (no "
                            f"features.conv0.weight); save the model's state_dict() to a file")
        body = {k: v for k, v in state.items() if k.startswith("features.")}
        self.channels = int(body["features.conv0.weight"].shape[1])
        net = DenseNet121(num_classes=1, in_channels=self.channels)
        load_state(net.features, {k[len("features."):]: v for k, v in body.items()},
                   f"{path}: the weights do not fit a DenseNet-121")
        self.net = net.to(self.device).eval().requires_grad_(False)
        # made once: a host-to-GPU copy per batch would wait for the GPU each time
        self._imagenet = [torch.tensor(v, device=self.device).view(1, 3, 1, 1) for v in self.IMAGENET]
        self.name = f"densenet121@{file_id(path)}"
        self.source = f"DenseNet-121 {path} ({self.channels}-channel, {self.SIZE} px)"

    @torch.no_grad()
    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Stored pixels -> the network's input (N, C, 224, 224), normalised."""
        x = unit_grey(images, self.device)
        if x.shape[-1] != self.SIZE or x.shape[-2] != self.SIZE:
            # antialiased where either side shrinks (a tall image's height too, not only a wide one's)
            x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False,
                              antialias=max(x.shape[-2:]) > self.SIZE)
        if self.channels == 1:  # torchxrayvision: [0, 1] -> [-1024, 1024]
            return (2 * x - 1) * 1024
        mean, std = self._imagenet
        return (x.expand(-1, 3, -1, -1) - mean) / std

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        with ieee_fp32():  # its one mode is float32 rounding, as Inception's exact mode (not TF32 on GPUs)
            return self.net.embed(x).float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.inputs(images))


def feature_space(spec: str | None = None, inception: str | None = None, random_weights: bool = False,
                  mode: str = "exact", device: torch.device | str = "cpu"):
    """The feature space named by ``spec`` (see the module docstring)."""
    spec = spec or DEFAULT
    kind, _, arg = spec.partition(":")
    if inception and spec != "inception":  # else ignored without a word, as --random-weights would be
        raise UserError(f"--inception {inception} gives the FID Inception's weights; it does not apply to --features "
                        f"{spec}: leave it out")
    if random_weights and spec != "inception":
        raise UserError(f"--random-weights gives a random Inception; it does not apply to --features {spec}")
    if mode == "fast" and spec != "inception":  # else ignored without a word
        raise UserError(f"--mode fast (bf16) is Inception's; --features {spec} has one mode, IEEE float32: leave "
                        f"--mode out")
    if kind == "inception" and not arg:
        return InceptionSpace(inception, random_weights, mode, device)
    if kind == "classifier" and arg:
        return ClassifierSpace(arg, device)
    if kind == "densenet121" and arg:
        return DenseNet121Space(arg, device)
    raise UserError(f"--features {spec!r}: expected inception, classifier:MODEL or densenet121:FILE")


def same_space(a: str | None, b: str | None, what_a: str = "A", what_b: str = "B") -> None:
    """Refuse to compare statistics or features of two different feature spaces (no name: Inception)."""
    a, b = a or DEFAULT, b or DEFAULT
    if a != b:
        raise UserError(f"{what_a} is in the feature space {a}, {what_b} in {b}: a distance between different "
                        f"feature spaces means nothing; compute both with the same --features")
