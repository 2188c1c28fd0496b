"""`xrayforge classify train ARCHIVE --out MODEL`: train the multi-label chest classifier.

BCE with logits on the archive's 14 ChestX-ray14 findings; a validation set split by
patient; per-finding AUROC on it after every epoch; the best epoch (mean AUROC) is kept;
per-finding decision thresholds are set on the validation set (Youden's J) and saved with
the model, for LCO's acceptance test.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.archive import Archive
from ..nn.classifier import ChestClassifier, ClassifierConfig, load_torchvision_weights
from .metrics import auroc, patient_split, youden_threshold


@dataclass
class ClassifierTrainConfig:
    archive: str
    out: str
    arch: str = "resnet18"
    input_size: int = 256
    width: int = 64
    epochs: int = 10
    batch: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 0
    device: str | None = None
    init_weights: str | None = None   # torchvision-layout state dict to start from
    augment: bool = True
    subset: list | None = None        # manifest positions to train/validate on (default: all but the "test" split)


def _resolution_for(archive: Archive, size: int) -> int:
    fits = [r for r in archive.resolutions if r >= size]
    return min(fits) if fits else archive.resolution


def load_batch(archive: Archive, positions, resolution: int, device) -> torch.Tensor:
    x = archive.as_float(archive.images(np.sort(positions), resolution))
    return torch.from_numpy(x).unsqueeze(1).to(device) * 2 - 1


@torch.no_grad()
def predict(model, archive: Archive, positions, resolution: int, device, batch: int = 64) -> np.ndarray:
    """Probabilities (len(positions), findings) for archive positions (in sorted order)."""
    model.eval()
    positions = np.sort(np.asarray(positions))
    out = []
    for i in range(0, len(positions), batch):
        out.append(torch.sigmoid(model(load_batch(archive, positions[i:i + batch], resolution, device))).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(model.findings)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random shifts and scalings, as radiographs are positioned; no flips."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, device=x.device)
    scale = 1 + 0.08 * (torch.rand(n, generator=gen) * 2 - 1)
    shift = 0.06 * (torch.rand(n, 2, generator=gen) * 2 - 1)
    theta[:, 0, 0], theta[:, 1, 1] = scale.to(x.device), scale.to(x.device)
    theta[:, :, 2] = shift.to(x.device)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def train_classifier(cfg: ClassifierTrainConfig, progress: bool = True) -> dict:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    archive = Archive(cfg.archive)
    if not archive.meta.get("labelled", True) or archive.labels.sum() == 0:
        raise ValueError(f"{cfg.archive}: the archive has no finding labels to learn")
    pool = np.asarray(cfg.subset) if cfg.subset is not None else \
        np.array([i for i, s in enumerate(archive.splits) if s != "test"])
    if len(pool) < 4:
        raise ValueError(f"{cfg.archive}: only {len(pool)} images to train on")
    val_mask = patient_split([archive.patient_ids[i] for i in pool], cfg.val_fraction, salt=f"val{cfg.seed}")
    train_pos, val_pos = pool[~val_mask], pool[val_mask]
    if len(val_pos) == 0 or len(train_pos) == 0:
        raise ValueError("the patient-level validation split left one side empty; change --val-fraction")
    torch.manual_seed(cfg.seed)
    model = ChestClassifier(ClassifierConfig(arch=cfg.arch, input_size=cfg.input_size, width=cfg.width,
                                             findings=list(archive.findings))).to(device)
    if cfg.init_weights:
        load_torchvision_weights(model, torch.load(cfg.init_weights, map_location="cpu", weights_only=True))
    res = _resolution_for(archive, cfg.input_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * math.ceil(len(train_pos) / cfg.batch))
    gen = torch.Generator().manual_seed(cfg.seed)
    labels = torch.from_numpy(archive.labels.astype(np.float32))
    history, best, best_state = [], -1.0, None
    from tqdm import tqdm
    for epoch in range(cfg.epochs):
        model.train()
        perm = train_pos[torch.randperm(len(train_pos), generator=gen).numpy()]
        losses = []
        for i in tqdm(range(0, len(perm), cfg.batch), desc=f"classifier epoch {epoch + 1}/{cfg.epochs}",
                      disable=not progress, leave=False, dynamic_ncols=True):
            idx = np.sort(perm[i:i + cfg.batch])
            x = load_batch(archive, idx, res, device)
            if cfg.augment:
                x = _augment(x, gen)
            loss = F.binary_cross_entropy_with_logits(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        probs = predict(model, archive, val_pos, res, device)
        y = archive.labels[np.sort(val_pos)]
        aucs = {f: auroc(y[:, k], probs[:, k]) for k, f in enumerate(archive.findings)}
        valid = [v for v in aucs.values() if not math.isnan(v)]
        mean_auc = float(np.mean(valid)) if valid else float("nan")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "mean_auroc": mean_auc,
                        "auroc": {k: v for k, v in aucs.items() if not math.isnan(v)}})
        if not math.isnan(mean_auc) and mean_auc > best:
            best, best_state = mean_auc, copy.deepcopy(model.state_dict())
            best_thresholds = {f: youden_threshold(y[:, k], probs[:, k]) for k, f in enumerate(archive.findings)
                               if not math.isnan(aucs[f])}
    if best_state is not None:
        model.load_state_dict(best_state)
        model.config.thresholds = best_thresholds
    out = Path(cfg.out)
    model.cpu().save(out)
    summary = {"model": str(out), "train_images": int(len(train_pos)), "val_images": int(len(val_pos)),
               "val_patients": len({archive.patient_ids[i] for i in val_pos}), "best_mean_auroc": best,
               "history": history, "thresholds": model.config.thresholds}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary
