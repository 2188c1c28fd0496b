"""The FID Inception v3 of pytorch-fid (TF's 2015-12-05 graph ported to PyTorch).

Same modules and state-dict keys as pytorch-fid's ``fid_inception_v3`` (torchvision's
Inception3 layout with the FID-specific blocks: average pools that exclude padding, and a
max pool in the last block), so ``pt_inception-2015-12-05-6726825d.pth`` loads unchanged.
``InceptionFeatures`` returns the 2048-d pool3 features. The weights are never downloaded:
they are looked up at an explicit path, ``XRAYFORGE_INCEPTION``, then torch hub's checkpoint
cache, where pytorch-fid keeps them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..utils.files import load_state, load_torch

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """E_1 (average pool without padding) or E_2 (max pool) of pytorch-fid."""

    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """Input: (N, 3, 299, 299) in [-1, 1]. Output: (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # kept so the published state dict loads strictly; unused for FID

    def stem_weight_gray(self) -> torch.Tensor:
        """The first conv's weight summed over RGB: a gray image replicated to three channels
        through the 3-channel conv equals the gray image through this one."""
        return self.Conv2d_1a_3x3.conv.weight.sum(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            c = self.Conv2d_1a_3x3
            x = F.relu(c.bn(F.conv2d(x, self.stem_weight_gray().to(x.dtype), stride=2)), inplace=True)
        else:
            x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def default_weight_locations() -> list[Path]:
    out = []
    if os.environ.get("XRAYFORGE_INCEPTION"):
        out.append(Path(os.environ["XRAYFORGE_INCEPTION"]))
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME)
    return out


def find_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file, or FileNotFoundError saying where to put it."""
    candidates = [Path(path)] if path else default_weight_locations()
    if path and Path(path).is_dir():
        raise FileNotFoundError(f"{path}: is a folder; expected the FID Inception weights file {WEIGHTS_NAME}")
    env = os.environ.get("XRAYFORGE_INCEPTION")
    if not path and env and not Path(env).is_file():  # a wrong setting, not a reason to take another file
        why = "a folder" if Path(env).is_dir() else "no such file"
        raise FileNotFoundError(
            f"FID Inception weights {WEIGHTS_NAME} not found at XRAYFORGE_INCEPTION={env} ({why}); point it at the "
            f"file, or unset it (then {Path(torch.hub.get_dir()) / 'checkpoints' / WEIGHTS_NAME} is used), or pass "
            f"--inception PATH. xrayforge never downloads them.")
    for c in candidates:
        if c.is_file():
            return c
    tried = "; ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"FID Inception weights {WEIGHTS_NAME} not found (looked at: {tried}). "
        f"xrayforge never downloads them. Copy the file (the one pytorch-fid uses) to "
        f"{Path(torch.hub.get_dir()) / 'checkpoints' / WEIGHTS_NAME}, or pass --inception PATH, or set "
        f"XRAYFORGE_INCEPTION=PATH.")


def load_inception(path: str | os.PathLike | None = None, random_weights: bool = False,
                   device: str | torch.device = "cpu") -> FIDInception:
    """The FID Inception in eval mode. ``random_weights=True`` gives a seeded random network:
    a pipeline check whose FIDs are not comparable with anything published."""
    if random_weights and path:
        raise UserError(f"--inception {path} and --random-weights: the weights file or a random network, not both")
    model = FIDInception()
    if random_weights:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("conv.weight") or name == "fc.weight":
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    else:
        weights = find_weights(path)
        state = load_torch(weights, "the FID Inception weights",
                           advice=f"use {WEIGHTS_NAME}, the file pytorch-fid uses (clean-fid's "
                                  f"inception-2015-12-05.pt is a TorchScript archive)")
        if isinstance(state, dict):
            # BatchNorm's batch counter (unused in eval mode) is absent from state dicts saved before PyTorch
            # 0.4.1 or with it dropped; torch's own loader fills it in, and so does this one
            for k, v in model.state_dict().items():
                if k.endswith(".num_batches_tracked") and k not in state:
                    state[k] = torch.zeros_like(v)
        torchvision = isinstance(state, dict) and (
            any(str(k).startswith("AuxLogits.") for k in state)
            or getattr(state.get("fc.weight"), "shape", None) == (1000, 2048))
        load_state(model, state, f"{weights}: not the FID Inception weights {WEIGHTS_NAME}",
                   "; torchvision's ImageNet Inception v3 is another network: use the file pytorch-fid uses"
                   if torchvision else "")
    return model.eval().requires_grad_(False).to(device)
