"""Latent class optimisation (LCO): steer an unconditional generator's latents with a
classifier until the image shows a wanted combination of findings (Segal et al. 2021).

A target maps findings to 1 (present) or 0 (absent); findings it does not name are free.
A batch of latents is optimised with Adam on BCE(classifier(G(z)), target) over the named
findings plus a prior term ``prior_weight * (|z| - sqrt(d))² / d`` that keeps z on the shell
where N(0, I) puts its mass. A sample is accepted as soon as every named finding passes its
threshold (p >= t for present, p < t for absent) and then stops moving; samples still short
after ``steps`` are rejected and counted. Targets are mixed freely within a batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def parse_target(text: str, findings) -> dict[str, int]:
    """'Cardiomegaly=1,Effusion=1,Nodule=0' -> {'Cardiomegaly': 1, 'Effusion': 1, 'Nodule': 0}."""
    findings = list(findings)
    known = ", ".join(findings)
    out = {}
    if not text or not text.strip():
        raise ValueError(f"empty LCO target; write e.g. 'Cardiomegaly=1,Nodule=0' with findings from: {known}")
    for item in text.split(","):
        item = item.strip()
        if "=" not in item:
            raise ValueError(f"bad LCO target item {item!r} in {text!r}: expected NAME=1 or NAME=0 "
                             f"(known findings: {known})")
        name, value = (s.strip() for s in item.split("=", 1))
        if name not in findings:
            raise ValueError(f"unknown finding {name!r} in {text!r}; known findings: {known}")
        if value not in ("0", "1"):
            raise ValueError(f"finding {name!r} must be =1 (present) or =0 (absent), got {value!r}")
        if name in out:
            raise ValueError(f"finding {name!r} appears twice in {text!r}")
        out[name] = int(value)
    return out


def format_target(target: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in target.items())


def target_tensors(target: dict, findings, thresholds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, mask, thresholds) over all findings for one target."""
    findings = list(findings)
    values, mask = torch.zeros(len(findings)), torch.zeros(len(findings))
    for name, v in target.items():
        values[findings.index(name)], mask[findings.index(name)] = float(v), 1.0
    return values, mask, torch.tensor([float(thresholds(f)) for f in findings])


def satisfied(probs: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    ok = torch.where(values > 0.5, probs >= thr, probs < thr)
    return (ok | (mask < 0.5)).all(dim=1)


def log_prior(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample."""
    d = z.shape[1]
    return -0.5 * z.square().sum(1) - 0.5 * d * math.log(2 * math.pi)


@dataclass
class LCOResult:
    z: torch.Tensor            # final latents (N, d)
    images: torch.Tensor       # G(z) in [-1, 1]
    probs: torch.Tensor        # classifier probabilities (N, F)
    accepted: torch.Tensor     # bool (N,)
    steps: torch.Tensor        # optimisation steps used (N,)
    log_prior_start: torch.Tensor
    log_prior_end: torch.Tensor
    cosine_moved: torch.Tensor  # cosine similarity between start and end latents


def optimise(G, classifier, z0: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, thresholds: torch.Tensor,
             steps: int = 100, lr: float = 0.05, prior_weight: float = 1.0, amp_dtype=None) -> LCOResult:
    """Run LCO on a batch; ``values``/``mask``/``thresholds`` are (N, F) (one target per row)."""
    device = z0.device
    values, mask, thresholds = values.to(device), mask.to(device), thresholds.to(device)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    d = z.shape[1]
    active = torch.ones(z.shape[0], dtype=torch.bool, device=device)
    used = torch.zeros(z.shape[0], dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)

    def evaluate(latents):
        with autocast:
            imgs = G(latents)
            logits = classifier(imgs).float()
        return imgs, logits

    z_keep = z0.clone()
    for step in range(steps + 1):
        imgs, logits = evaluate(z)
        probs = torch.sigmoid(logits)
        newly = satisfied(probs.detach(), values, mask, thresholds) & active
        z_keep[newly] = z.detach()[newly]
        active &= ~newly
        if step == steps or not active.any():
            break
        bce = F.binary_cross_entropy_with_logits(logits, values, reduction="none")
        loss_cls = (bce * mask).sum(1) / mask.sum(1).clamp_min(1)
        prior = prior_weight * (z.norm(dim=1) - math.sqrt(d)).square() / d
        loss = ((loss_cls + prior) * active.float()).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # accepted samples stay where they were accepted (Adam's momentum would move them)
            z[~active] = z_keep[~active]
        used += active.long()
    with torch.no_grad():
        accepted = satisfied(probs, values, mask, thresholds)
        return LCOResult(z.detach(), imgs.detach().float(), probs.detach(), accepted, used,
                         log_prior(z0), log_prior(z.detach()),
                         F.cosine_similarity(z0, z.detach(), dim=1))
