"""Folders laid out like `xrayforge sample` output, made from phantoms: a 'generator' whose
images and labels the test controls exactly."""
import csv
import json

import numpy as np
from PIL import Image

from xrayforge.data.labels import FINDINGS
from xrayforge.data.phantom import render


def write_sample_folder(folder, seeds, resolution=32, invert_labels=False, target=None, findings=FINDINGS,
                        thresholds=None):
    """One phantom per seed as shard-00000/<index>.png with a manifest whose p_<finding> columns
    say the truth (0.9 / 0.1), or its opposite (``invert_labels``: a generator whose images show
    the opposite of the findings the classifier reported)."""
    folder.mkdir(parents=True)
    shard = folder / "shard-00000"
    shard.mkdir()
    truth = []
    for k, seed in enumerate(seeds):
        img, have = render(resolution, seed)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(shard / f"{k:08d}.png")
        truth.append([int(have.get(f, False)) for f in findings])
    truth = np.array(truth)
    if invert_labels:
        truth = 1 - truth
    rows = []
    for k, vec in enumerate(truth):
        rows.append({"file": f"shard-00000/{k:08d}.png", "index": k, "seed": 0, "latent_seed": 0, "latent_index": k,
                     "target": target or "", "lco_steps": 0, "latent_file": "shard-00000.latents.npy",
                     "latent_row": k, **{f"p_{f}": 0.9 if v else 0.1 for f, v in zip(findings, vec)}})
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (folder / "sample_config.json").write_text(json.dumps({"format": "png8", "n": len(rows)}))
    (folder / "summary.json").write_text(json.dumps({"thresholds": thresholds or {f: 0.5 for f in findings}}))
    return truth


def rewrite_checkpoint_file(folder, name, obj):
    """torch.save ``obj`` over a checkpoint's ``name`` (networks.pt, state.pt) and record its new digest in
    networks.json, as a checkpoint written with those contents would have: a test that means to give a
    checkpoint other contents, not to damage it."""
    from pathlib import Path

    import torch

    from xrayforge.utils.files import file_digest
    folder = Path(folder)
    torch.save(obj, folder / name)
    meta = json.loads((folder / "networks.json").read_text())
    meta.setdefault("sha256", {})[name] = file_digest(folder / name)
    (folder / "networks.json").write_text(json.dumps(meta, indent=2))
