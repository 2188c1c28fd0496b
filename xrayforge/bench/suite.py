"""`xrayforge bench`: the benchmark suite at the sizes that fit the device, printed as the
README's table (and every row as JSON with --json)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SUITES = ("ops", "train_step", "fid", "data", "sampling")


def run_suite(suites=SUITES, device: str | None = None, quick: bool = False, progress: bool = True) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda" and not quick
    results = {}
    for name in suites:
        if progress:
            print(f"[bench] {name} ...", flush=True)
        if name == "ops":
            from . import ops
            results[name] = (ops.run(str(dev), quick=not gpu), ops.COLUMNS)
        elif name == "train_step":
            from . import train_step
            results[name] = (train_step.run((64, 256, 512, 1024) if gpu else (16, 32), device=str(dev),
                                            net_resolution=1024 if gpu else 64, fmap_max=512 if gpu else 64),
                             train_step.COLUMNS)
        elif name == "fid":
            from . import fid
            results[name] = (fid.run(2048 if gpu else 16, 1024 if gpu else 64, 256 if gpu else 8,
                                     50000 if gpu else 2000, None, str(dev), 8 if gpu else 0), fid.COLUMNS)
        elif name == "data":
            from . import data
            results[name] = (data.run(64 if gpu else 16, 1024 if gpu else 256), data.COLUMNS)
        elif name == "sampling":
            from . import sampling
            results[name] = (sampling.run(device=str(dev), resolution=None if gpu else 64), sampling.COLUMNS)
        else:
            raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(SUITES)}")
    return results


def print_tables(results: dict) -> None:
    from . import format_table
    for name, (result, columns) in results.items():
        print(f"\n### {name} — {result['device']['name']}, {result['environment']['date'][:10]}\n")
        print(format_table(result["rows"], columns))


def is_bench_json(path) -> bool:
    """Whether ``path`` is empty or holds what ``save_json`` writes ({suite: {..., "rows": [...]}}): the
    only files ``xrayforge bench --json`` replaces."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            return True
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and bool(data) and all(
        k in SUITES and isinstance(v, dict) and "rows" in v for k, v in data.items())


def save_json(results: dict, path: str) -> None:
    """Write every suite's rows to ``path`` through a temporary file (never half-written)."""
    from ..utils.files import write_text_atomic
    from . import json_text
    write_text_atomic(Path(path), json_text({name: result for name, (result, _) in results.items()}))
