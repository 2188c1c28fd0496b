"""`xrayforge classify train ARCHIVE --out MODEL`: train the multi-label chest classifier.

BCE with logits on the archive's 14 ChestX-ray14 findings; a validation set split by
patient; per-finding AUROC on it after every epoch; the best epoch (mean AUROC) is kept;
per-finding decision thresholds are set on the validation set (Youden's J) and saved with
the model, for LCO's acceptance test.

training.json records, beside the history, which images the weights were fitted to
(``training_data``: the archive's identity and a mask of its manifest positions), so that an
evaluation comparing the classifier's calls on real and synthetic images can leave out the
images it fitted (on them it is more confident than on unseen ones; `evaluate diversity`).
"""
from __future__ import annotations

import base64
import copy
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.archive import Archive
from ..errors import UserError
from ..utils.files import json_safe, read_json, write_text_atomic
from ..nn.classifier import ChestClassifier, ClassifierConfig, load_torchvision_weights, resize_input
from .metrics import auroc, patient_split, youden_threshold


@dataclass(kw_only=True)
class ClassifierTraining:
    """How a classifier is built and trained: shared by `classify train` and the TSTR evaluation."""
    arch: str = "resnet18"
    input_size: int = 256
    width: int = 64
    epochs: int = 10
    batch: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 0
    device: str | None = None

    def model_config(self, findings) -> ClassifierConfig:
        return ClassifierConfig(arch=self.arch, input_size=self.input_size, width=self.width, findings=list(findings))


@dataclass
class ClassifierTrainConfig(ClassifierTraining):
    archive: str
    out: str
    init_weights: str | None = None   # torchvision-layout state dict to start from
    augment: bool = True
    subset: list | None = None        # manifest positions to train/validate on (default: the archive's training_positions)


def _resolution_for(archive: Archive, size: int) -> int:
    fits = [r for r in archive.resolutions if r >= size]
    return min(fits) if fits else archive.resolution


class LabelledImages:
    """Images drawn from one or more archives, labelled over the findings they share, with their
    patient ids: what a classifier is trained and tested on. Item ``i`` is position
    ``positions[i]`` of archive ``parts[i]``."""

    def __init__(self, sources: list[tuple[Archive, np.ndarray]], findings=None):
        if not sources:
            raise ValueError("no images")
        self.archives = [a for a, _ in sources]
        self.findings = list(findings) if findings is not None else \
            [f for f in self.archives[0].findings if all(f in a.findings for a in self.archives)]
        parts, positions, labels, patients = [], [], [], []
        for k, (arc, pos) in enumerate(sources):
            pos = np.asarray(pos, dtype=np.int64)
            cols = [arc.findings.index(f) for f in self.findings]
            parts.append(np.full(len(pos), k))
            positions.append(pos)
            labels.append(arc.labels[pos][:, cols])
            patients += [arc.patient_ids[p] or f"{arc.path}#{p}" for p in pos]
        self.parts, self.positions = np.concatenate(parts), np.concatenate(positions)
        self.labels = np.concatenate(labels).astype(np.int8)
        self.patient_ids = patients

    def __len__(self) -> int:
        return len(self.positions)

    def load(self, items, size: int, device) -> torch.Tensor:
        """Items (indices into this set) as (b, 1, size, size) in [-1, 1], in the given order."""
        items = np.asarray(items)
        out = torch.empty(len(items), 1, size, size)
        for k, arc in enumerate(self.archives):
            mine = np.flatnonzero(self.parts[items] == k)
            if not len(mine):
                continue
            pos = self.positions[items[mine]]
            order = np.argsort(pos, kind="mergesort")  # sorted reads from the memory map
            res = _resolution_for(arc, size)
            x = torch.from_numpy(arc.as_float(arc.images(pos[order], res))).unsqueeze(1)
            x = resize_input(x, size)  # as the model would, so that sources of any size mix in a batch
            out[torch.from_numpy(mine[order])] = x
        return out.to(device) * 2 - 1


@torch.no_grad()
def predict(model, images: LabelledImages, items, device, batch: int = 64) -> np.ndarray:
    """Probabilities (len(items), model findings) for the items, in the given order."""
    model.eval()
    items = np.asarray(items)
    size = model.config.input_size
    out = [torch.sigmoid(model(images.load(items[i:i + batch], size, device)).float()).cpu()
           for i in range(0, len(items), batch)]
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


@dataclass
class FitResult:
    model: ChestClassifier
    history: list
    best_mean_auroc: float
    best_epoch: int = 1


def fit(images: LabelledImages, train_items, val_items, settings: ClassifierTraining, augment: bool = True,
        init_weights: str | None = None, progress: bool = True, desc: str = "classifier") -> FitResult:
    """Train on ``train_items``; keep the epoch with the best mean validation AUROC, and set the
    per-finding decision thresholds on the validation items (Youden's J)."""
    epochs, batch, lr, seed = settings.epochs, settings.batch, settings.lr, settings.seed
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_items, val_items = np.asarray(train_items), np.asarray(val_items)
    # batch norm cannot train on one image: such batches are skipped below, so these would train nothing
    if batch < 2:
        raise UserError(f"--batch {batch}: a training batch needs at least 2 images")
    # the CLI refuses these when parsed; through the API they failed in the scheduler (ZeroDivisionError)
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise UserError(f"--epochs {epochs!r}: training needs a whole number of epochs, at least 1")
    if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr {lr!r}: the learning rate must be a positive number")
    epochs, lr = int(epochs), float(lr)  # numpy's: the LR scheduler takes Python numbers alone
    if len(train_items) < 2:
        raise UserError(f"{desc}: {len(train_items)} training image(s); at least 2 are needed")
    torch.manual_seed(seed)
    model = ChestClassifier(settings.model_config(images.findings)).to(device)
    if init_weights:
        from ..utils.files import load_torch
        try:
            load_torchvision_weights(model, load_torch(init_weights, "torchvision-layout weights (--init-weights)"))
        except ValueError as exc:  # which file does not fit, not only how
            if isinstance(exc, UserError):
                raise
            raise UserError(f"{init_weights}: {exc}") from None
    size = settings.input_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * math.ceil(len(train_items) / batch))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(images.labels.astype(np.float32))
    y_val = images.labels[val_items]
    history, best, best_state, best_thresholds = [], -1.0, None, {}
    from tqdm import tqdm
    for epoch in range(epochs):
        model.train()
        perm = train_items[torch.randperm(len(train_items), generator=gen).numpy()]
        losses = []
        for i in tqdm(range(0, len(perm), batch), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                      disable=not progress, leave=False, dynamic_ncols=True):
            idx = np.sort(perm[i:i + batch])  # ascending items: archive reads in order
            if len(idx) < 2:  # batch norm cannot train on one image (at small sizes its maps are 1×1)
                continue
            x = images.load(idx, size, device)
            if augment:
                x = _augment(x, gen)
            loss = F.binary_cross_entropy_with_logits(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        probs = predict(model, images, val_items, device)
        if not (np.isfinite(losses).all() and np.isfinite(probs).all()):  # its AUROCs and thresholds would be NaN
            raise UserError(f"{desc}: training diverged in epoch {epoch + 1} (mean loss {np.mean(losses):.3g}, "
                            f"outputs no longer finite); use a lower --lr than {lr:g}")
        aucs = {f: auroc(y_val[:, k], probs[:, k]) for k, f in enumerate(images.findings)}
        valid = [v for v in aucs.values() if not math.isnan(v)]
        mean_auc = float(np.mean(valid)) if valid else float("nan")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "mean_auroc": mean_auc,
                        "auroc": {k: v for k, v in aucs.items() if not math.isnan(v)}})
        # without a validation AUROC (no finding with both classes among the validation images: the same
        # every epoch) nothing tells the epochs apart, and the last, trained longest, is kept, not the first
        if best_state is None or (math.isnan(best) if math.isnan(mean_auc) else math.isnan(best) or mean_auc > best):
            best, best_state, best_epoch = mean_auc, copy.deepcopy(model.state_dict()), epoch + 1
            best_thresholds = {f: youden_threshold(y_val[:, k], probs[:, k]) for k, f in enumerate(images.findings)
                               if not math.isnan(aucs[f])}
    model.load_state_dict(best_state)
    model.config.thresholds = best_thresholds
    return FitResult(model, history, best, best_epoch)


def train_classifier(cfg: ClassifierTrainConfig, progress: bool = True) -> dict:
    from ..utils.files import check_out_dir, claim_output
    check_out_dir(cfg.out)
    trained = Path(cfg.out) / "classifier.json"
    if trained.is_file():  # training does not resume: running again would replace the model
        raise UserError(f"{cfg.out}: already holds a trained classifier ({trained.name}); archives sampled with "
                        f"it name this folder. Choose another --out, or remove the folder to train it again")
    archive = Archive(cfg.archive)
    if not archive.meta.get("labelled", True) or archive.labels.sum() == 0:
        raise ValueError(f"{cfg.archive}: the archive has no finding labels to learn")
    pool = np.asarray(cfg.subset) if cfg.subset is not None else archive.training_positions()
    if len(pool) < 4:
        raise ValueError(f"{cfg.archive}: only {len(pool)} images to train on")
    counts = archive.labels[pool].sum(0)
    if not ((counts > 0) & (counts < len(pool))).any():  # every finding is constant: nothing to tell apart
        raise ValueError(f"{cfg.archive}: no finding is both present and absent among the {len(pool)} images to "
                         f"train on (" + ", ".join(f"{f}: {int(c)}" for f, c in zip(archive.findings, counts) if c)
                         + "); a classifier would learn nothing")
    images = LabelledImages([(archive, pool)], archive.findings)
    val_mask = patient_split(images.patient_ids, cfg.val_fraction, salt=f"val{cfg.seed}")
    train_items, val_items = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    if len(val_items) == 0 or len(train_items) == 0:
        raise ValueError("the patient-level validation split left one side empty; change --val-fraction")
    claim_output(cfg.out, "classify train", signatures=("classifier.json",))  # once the input is known good
    result = fit(images, train_items, val_items, cfg, cfg.augment, cfg.init_weights, progress)
    out = Path(cfg.out)
    model = result.model
    summary = {"model": str(out), "train_images": int(len(train_items)), "val_images": int(len(val_items)),
               "val_patients": len({images.patient_ids[i] for i in val_items}),
               "best_mean_auroc": result.best_mean_auroc, "best_epoch": result.best_epoch, "history": result.history,
               "thresholds": model.config.thresholds,
               # how many validation images have each finding: where none or all do, its AUROC is undefined
               # (and its threshold the default 0.5), which `classify train` says
               "val_positives": {f: int(n) for f, n in zip(images.findings, images.labels[val_items].sum(0))}}
    summary["training_data"] = training_record(archive, images.positions[train_items], cfg.subset is not None)
    # the record first, the model's classifier.json last: a folder with that file is a finished
    # classifier (a rerun refuses it), and one killed before it is trained again
    write_text_atomic(out / "training.json", json.dumps(json_safe(summary), indent=2))  # NaN: null, as JSON has it
    model.cpu().save(out)
    return summary


TRAINED_ON_ENCODING = "base64 of numpy.packbits of a boolean per manifest position"


def training_record(archive: Archive, trained: np.ndarray, subset: bool = False) -> dict:
    """What training.json records of the images a classifier was fitted to: the archive (its path,
    source and ``archive_id``, the SHA-1 of its manifest, which names its images, labels, splits and
    patients wherever it lies) and a mask of the manifest positions the weights were fitted to
    (``trained_on``; its validation images, which chose the epoch and the thresholds, are not in it).
    The images of other patients are unseen by the classifier (``held_out_positions``)."""
    from .labelled import archive_id
    mask = np.zeros(len(archive), dtype=bool)
    mask[np.asarray(trained, dtype=np.int64)] = True
    return {"archive": str(archive.path), "archive_id": archive_id(archive.path),
            "source": archive.meta.get("source"), "archive_images": int(len(archive)),
            "pool": "subset" if subset else "training_positions", "trained_images": int(mask.sum()),
            "trained_on": base64.b64encode(np.packbits(mask).tobytes()).decode("ascii"),
            "trained_on_encoding": TRAINED_ON_ENCODING}


def recorded_training(folder) -> dict | None:
    """A classifier folder's ``training_data`` record with ``trained_on`` decoded to a boolean mask,
    or None where it has none (trained by an older xrayforge, by `evaluate tstr`, or elsewhere)."""
    path = Path(folder) / "training.json"
    if not path.is_file():
        return None
    record = read_json(path, "the classifier's training record").get("training_data")
    if not record:
        return None
    try:
        n = int(record["archive_images"])
        if record.get("trained_on_encoding", TRAINED_ON_ENCODING) != TRAINED_ON_ENCODING or n < 0:
            raise ValueError(f"unknown encoding {record.get('trained_on_encoding')!r}")
        bits = np.frombuffer(base64.b64decode(record["trained_on"], validate=True), dtype=np.uint8)
        if len(bits) != (n + 7) // 8:
            raise ValueError(f"a mask of {len(bits) * 8} positions for {n} images")
        mask = np.unpackbits(bits)[:n].astype(bool)
        if not isinstance(record["archive_id"], str):
            raise ValueError("no archive_id")
    except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
        raise UserError(f"{path}: damaged training_data record ({type(exc).__name__}: {exc})") from None
    return {**record, "trained_on": mask}


def held_out_positions(archive: Archive, trained_on: np.ndarray) -> np.ndarray:
    """The manifest positions of ``archive`` whose patient a classifier fitted to the positions
    ``trained_on`` (a boolean mask) never saw: not fitted to, and not of a patient it was fitted to
    (an empty patient id is no patient: such an image stands for itself)."""
    trained_on = np.asarray(trained_on, dtype=bool)
    if len(trained_on) != len(archive):
        raise ValueError(f"{archive.path}: a mask of {len(trained_on)} positions for {len(archive)} images")
    patients = {archive.patient_ids[p] for p in np.flatnonzero(trained_on)} - {""}
    seen = trained_on | np.array([bool(p) and p in patients for p in archive.patient_ids], dtype=bool)
    return np.flatnonzero(~seen)
