"""Benchmark of the data pipeline: `prepare` throughput on 1024-px 8-bit PNG, 16-bit PNG and
DICOM files, and loader throughput from the memory-mapped archive at each resolution (images/s,
and images/s per core used), to compare against the training step's images/s."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data.archive import Archive
from ..data.loader import BatchStream, to_unit_range
from ..data.phantom import render
from ..data.prepare import prepare
from . import device_info, environment, format_table, results_dir, write_results


def _write_sources(folder: Path, kind: str, n: int, size: int):
    from PIL import Image
    folder.mkdir(parents=True)
    for i in range(n):
        img, _ = render(size, i)
        if kind == "png8":
            Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / f"{i:05d}.png")
        elif kind == "png16":
            Image.fromarray((img * 65535).round().astype(np.uint16)).save(folder / f"{i:05d}.png")
        else:
            import pydicom
            from pydicom.dataset import Dataset, FileMetaDataset
            from pydicom.uid import ExplicitVRLittleEndian, generate_uid
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.Rows = ds.Columns = size
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = (img * 4095).round().astype(np.uint16).tobytes()
            pydicom.dcmwrite(folder / f"{i:05d}.dcm", ds, enforce_file_format=True)


def run(n: int = 64, size: int = 1024, workers: int | None = None, loader_batch: int = 64) -> dict:
    workers = workers or os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive_path = None
        for kind in ("png8", "png16", "dicom"):
            src = tmp / kind
            _write_sources(src, kind, n, size)
            out = tmp / f"arch-{kind}"
            t0 = time.perf_counter()
            prepare(str(src), out, resolution=size, workers=workers, bits=16 if kind == "png16" else 8, progress=False)
            dt = time.perf_counter() - t0
            rows.append({"stage": "prepare", "input": kind, "images": n, "workers": workers,
                         "img_s": n / dt, "img_s_per_core": n / dt / workers})
            archive_path = archive_path or out
            shutil.rmtree(src)
        arc = Archive(archive_path)
        stream = BatchStream(arc, seed=0)
        for res in arc.resolutions:
            batches = max(3, (4 * n) // loader_batch)
            t0 = time.perf_counter()
            for b in range(batches):
                x = to_unit_range(torch.from_numpy(stream.load(b * loader_batch, loader_batch, res)), 255)
            dt = time.perf_counter() - t0
            rows.append({"stage": "loader", "input": f"{res} px", "images": batches * loader_batch, "workers": 1,
                         "img_s": batches * loader_batch / dt, "img_s_per_core": batches * loader_batch / dt})
            del x
    return {"benchmark": "data", "device": device_info(torch.device("cpu")).as_dict(),
            "environment": environment(), "cpu_count": os.cpu_count(), "rows": rows,
            "settings": {"n": n, "size": size, "workers": workers, "loader_batch": loader_batch},
            "notes": "prepare: files -> archive, all stages; loader: archive -> float tensor in [-1, 1], one thread "
                     "(the page cache is warm: the archive was just written)"}


COLUMNS = [("stage", "stage"), ("input", "input"), ("images", "images"), ("workers", "workers"),
           ("img_s", "img/s"), ("img_s_per_core", "img/s per core")]


def parser() -> argparse.ArgumentParser:
    from ..cli._args import positive_int, power_of_two
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=positive_int, default=64, help="images per input kind (default 64)")
    p.add_argument("--size", type=power_of_two, default=1024, help="source image side in px, a power of two "
                   "(default 1024)")
    p.add_argument("--workers", type=positive_int, default=None, help="prepare's processes (default: every core)")
    p.add_argument("--out", type=results_dir, default=None, help="results folder (default benchmarks/results)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    result = run(args.n, args.size, args.workers)
    print(format_table(result["rows"], COLUMNS))
    print(f"wrote {write_results('data', result, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
