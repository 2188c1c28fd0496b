"""The GPU window: one prepared run that validates every kernel and measures every target.

``benchmarks/gpu_check.sh`` installs the project and builds the CUDA extension, then runs
``python -m xrayforge.bench.gpu_check``, which runs the stages below in order, each in its own
process under its own time cap, recording each as passed / failed / timed out / skipped with
its duration and error, and always going on to the next:

  env       GPU, driver, versions, commit; measured copy bandwidth and bf16 matmul rate
  tests     the ``gpu``-marked tests (junit XML) -> which (op, backend) pairs are validated
  ops       eager vs triton vs cuda at the shapes of a 1024-px G and D, fwd and fwd+bwd
  conv      ops.conv2d_eqlr (Triton) vs cuDNN + epilogue at every conv layer of a 1024-px G and D
  train     the WGAN-GP step at 256 and 1024 px, bf16, batches 16 and 32, per-phase times; then the
            trainer's whole loop against its bare step (the demo's GPU network, 64 px, fp32)
  fid       Inception img/s (exact, fast), preprocessing kernel, moments, Fréchet, fast-mode error,
            masked moments (K = 1 and 15, torch float64 loop vs Triton)
  sampling  sampling img/s at 1024 px into PNG, LCO steps/s

Every stage writes its results as it goes, so a stage killed at its cap still reports what
it measured. ``--out`` receives at most five files: gpu_check.json (every figure),
gpu_check.md (the tables for the README), gpu_check.log, gpu_tests.xml and build.log (the
last written by the shell script); while it runs, also .setup.json and .work/ with the context
and the running stage's part (so at most eight even if the run is killed). ``--dry-run`` runs
the same stages at tiny sizes on the CPU (Triton in the interpreter; CUDA-only parts skipped
and marked so).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from pathlib import Path

from ..utils.files import write_text_atomic
from . import commit, error_summary

ROOT = Path(__file__).resolve().parents[2]  # the repository: stages, pytest and git run there
STAGES = ("env", "tests", "ops", "conv", "train", "fid", "knn", "sampling")
# Per-stage time caps in seconds on a GPU (the whole run is planned for <= 8 min on an H100; the
# conv stage alone may take 5: with ops.conv2d_eqlr's autotuner it compiles and times up to six tile
# configurations per layer shape, about 110 kernels, so a window runs it with --only conv)
# and in the dry run on a 2-core CPU (the whole dry run < 5 min).
CAPS = {"env": 60, "tests": 150, "ops": 110, "conv": 300, "train": 240, "fid": 110, "knn": 60, "sampling": 70}
DRY_CAPS = {"env": 60, "tests": 120, "ops": 90, "conv": 90, "train": 120, "fid": 120, "knn": 60, "sampling": 90}
MIN_USEFUL = 20  # a stage is not started with less time than this left in the budget
FLOOR = 30       # seconds kept back for each later stage, so one slow stage cannot starve the rest

# Which op each test file validates, and how a test's id names the backend it ran.
TEST_FILE_OPS = {
    "test_ops_pixel_norm.py": ("pixel_norm", "bias_lrelu_pixel_norm"),
    "test_ops_bias_lrelu.py": ("bias_lrelu",),
    "test_ops_minibatch_stddev.py": ("minibatch_stddev",),
    "test_fid.py": ("fid_preprocess",),
    "test_ops_knn.py": ("knn",),
    "test_ops_moments.py": ("masked_moments",),
    "test_ops_conv2d_eqlr.py": ("conv2d_eqlr",),
}
OUT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log", "gpu_tests.xml", "build.log")


# --------------------------------------------------------------------------- sizes
def sizes(dry: bool) -> dict:
    """What each stage measures: the real sizes on a GPU, tiny ones in the dry run."""
    if dry:
        return {"copy_mib": 64, "matmul_n": 512,
                "ops": dict(resolution=16, batch=2, fmap_max=16, target=False, per_op=2, reps=2, warmup=1,
                            min_seconds=0.0, dtypes=("float32", "bfloat16")),
                "conv": dict(resolution=16, fmap_max=16, batch=2, dtype="float32", layers=4, reps=1, warmup=1,
                             min_seconds=0.0),
                "train": dict(configs=((8, 2, ("baseline", "torch-fused", "torch-gradfix", "triton", "cuda"), True),),
                              net_resolution=16, fmap_max=16, reps=1, warmup=1,
                              loop=dict(resolution=16, batch=4, ticks=3, tick_images=32, latent_dim=16,
                                        fmap_base=64, fmap_max=16, archive_images=32, steps=4, warmup=1)),
                "fid": dict(batch=2, size=64, moment_n=2000, dim=256, accuracy_images=8, scipy=True, warmup=1, reps=1,
                            masked_n=64, masked_dim=40, masked_exact_below=0),
                "knn": dict(n=96, dim=32, check=96),
                "sampling": dict(resolution=16, n=8, batch=4, fmap_max=16, lco_batch=2, lco_steps=2,
                                 classifier_size=32, classifier_width=8)}
    return {"copy_mib": 2048, "matmul_n": 8192,
            "ops": dict(resolution=1024, batch=16, fmap_max=512, target=True, per_op=None, reps=20, warmup=3,
                        min_seconds=0.02, dtypes=("float32", "bfloat16")),
            # every distinct conv layer of the 1024-px G and D, as the training step runs them
            "conv": dict(resolution=1024, fmap_max=512, batch=16, dtype="bfloat16", layers=None, reps=10, warmup=2,
                         min_seconds=0.02),
            # (px, batch, modes, per-phase times): the most telling first, in case the cap cuts the rest
            "train": dict(configs=((1024, 16, ("baseline", "torch-fused", "torch-gradfix", "triton", "cuda"), True),
                                   (256, 32, ("baseline", "torch-fused", "torch-gradfix", "triton", "cuda"), True),
                                   (1024, 32, ("baseline", "triton", "cuda"), False)),
                          net_resolution=1024, fmap_max=512, reps=3, warmup=1,
                          # the trainer's whole loop against its bare step: the demo's GPU network and
                          # precision (fp32) at 64 px; at most 45 s of training
                          loop=dict(resolution=64, batch=16, ticks=3, tick_images=2048, max_seconds=45)),
            "fid": dict(batch=256, size=1024, moment_n=50000, dim=2048, accuracy_images=2000, scipy=True, warmup=2,
                        reps=5, masked_n=50000, masked_dim=2048, masked_exact_below=None),
            # the archive scale: radii and neighbours of 100k × 100k 2048-d features
            "knn": dict(n=100000, dim=2048, check=2000),
            "sampling": dict(resolution=1024, n=128, batch=32, fmap_max=512, lco_batch=16, lco_steps=10,
                             classifier_size=256, classifier_width=64)}


# --------------------------------------------------------------------------- stage plumbing
class Part:
    """A stage's results, rewritten atomically after every update (a killed stage keeps them)."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1, default=str))

    def add_row(self, key: str, row: dict) -> None:
        self.data.setdefault(key, []).append(row)
        self.save()
        print(json.dumps(row, default=str)[:400], flush=True)  # progress, in the log


def _device(dry: bool, part: Part | None = None):
    """The stage's device; with ``part``, recorded in it (name and limits, and the versions): a run
    with ``--only`` and no env stage still says which GPU and software its figures are from."""
    import torch

    from . import device_info, environment
    if dry:
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible to PyTorch; use --dry-run on a machine without a GPU")
    else:
        dev = torch.device("cuda")
    if part is not None:
        part.data["device"], part.data["versions"] = device_info(dev).as_dict(), environment()
        part.save()
    return dev


# --------------------------------------------------------------------------- stage: env
def stage_env(part: Part, dry: bool, out: Path, context: dict) -> None:
    import platform

    import torch

    from . import device_info, time_fn
    from ..ops import available_backends
    from ..ops._backend import GPU_VALIDATED
    dev = _device(dry)
    size = sizes(dry)
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": device_info(dev).as_dict(), "commit": commit()["commit"], "dry_run": dry}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import xrayforge._C as ext
        env["cuda_extension"] = {"built": True, "ops": list(ext.OPS)}
    except ImportError as exc:
        env["cuda_extension"] = {"built": False, "why": str(exc)}
    env["available_backends"] = {op: available_backends(op, dev) for op in GPU_VALIDATED}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env["gpu"] = {"name": props.name, "memory_gib": props.total_memory / 2 ** 30,
                      "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvidia_smi"] = error_summary(exc)
    part.data["environment"] = env
    part.save()
    # the memory-bound reference: a large device-to-device copy, bytes read + written
    n = size["copy_mib"] * 2 ** 20 // 4
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), dev, warmup=3, reps=20, min_seconds=0.0)
    part.data["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    # the compute-bound reference: a square bf16 matrix product
    m = size["matmul_n"]
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    ms = time_fn(lambda: a @ b, dev, warmup=3, reps=10, min_seconds=0.0)
    part.data["matmul_bf16_tflops"] = 2 * m ** 3 / ms / 1e9
    part.save()


# --------------------------------------------------------------------------- stage: tests
def stage_tests(part: Part, dry: bool, out: Path, context: dict) -> None:
    junit = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    have_timeout = importlib.util.find_spec("pytest_timeout") is not None
    if have_timeout:
        cmd.append("--timeout=120")
    if dry:
        # on the CPU the gpu-marked tests are collected and skipped; a few interpreter tests of
        # the same files exercise the junit parsing and the validation table
        cmd += ["-m", "gpu or not gpu", "-k", "gpu or hand_computed or test_reference_hand_computed",
                "tests/test_ops_pixel_norm.py", "tests/test_ops_bias_lrelu.py",
                "tests/test_ops_minibatch_stddev.py"]
        part.data["skipped"] = ["the gpu-marked tests (pytest skips them without CUDA)"]
    else:
        workers = importlib.util.find_spec("xdist") is not None
        cmd += ["-m", "gpu"] + (["-n", "4"] if workers else []) + ["tests"]
    part.data["command"] = " ".join(cmd[1:])
    part.data["per_test_timeout"] = 120 if have_timeout else None
    part.save()
    proc = subprocess.run(cmd, cwd=ROOT)
    part.data["pytest_exit_code"] = proc.returncode
    if junit.is_file():
        part.data.update(parse_junit(junit))
    part.save()
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"pytest exited with {proc.returncode}: {part.data.get('failed_tests', [])[:5]}")


def _backend_of(test_id: str) -> str | None:
    """The backend a test ran, from its parameter id: 'triton-cuda' / 'cuda-cuda' / 'triton-cpu'
    (conftest.kernel_params) or a bare 'triton' / 'cuda' (the full-size tests)."""
    if "[" not in test_id:
        return None
    params = test_id[test_id.index("[") + 1:test_id.rindex("]")]
    for fused in ("triton", "cuda"):
        if f"{fused}-cuda" in params or f"{fused}-cpu" in params:
            return fused
    tokens = params.split("-")
    for fused in ("triton", "cuda"):
        if fused in tokens:
            return fused
    return None


def parse_junit(path: Path) -> dict:
    """Counts per (op, backend) from a junit XML, and which pairs are validated: at least one
    of their tests passed and none failed."""
    tree = ET.parse(path)
    per_pair: dict[str, dict] = {}
    failed, totals = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in tree.iter("testcase"):
        file = Path((case.get("file") or case.get("classname", "").replace(".", "/") + ".py")).name
        name = case.get("name", "")
        outcome = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
            failed.append(f"{case.get('classname')}::{name}")
        elif case.find("skipped") is not None:
            outcome = "skipped"
        totals[outcome] += 1
        backend = _backend_of(name)
        for op in TEST_FILE_OPS.get(file, ()):
            if backend is None:
                continue
            key = f"{op}/{backend}"
            per_pair.setdefault(key, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
    validated = sorted(k for k, v in per_pair.items() if v["passed"] and not v["failed"])
    return {"totals": totals, "per_pair": per_pair, "validated": validated, "failed_tests": failed}


# --------------------------------------------------------------------------- stage: ops
def stage_ops(part: Part, dry: bool, out: Path, context: dict) -> None:
    from . import ops as ops_bench
    dev = _device(dry, part)
    cfg = sizes(dry)["ops"]
    shapes = ops_bench.pggan_shapes(cfg["resolution"], cfg["batch"], cfg["fmap_max"], cfg["target"])
    if cfg["per_op"]:
        shapes = {op: s[:cfg["per_op"]] for op, s in shapes.items()}
    part.data["shapes"] = {op: [list(s) for s in v] for op, v in shapes.items()}
    if dev.type != "cuda":
        part.data["skipped"] = ["backend cuda (CUDA-only)"]
    copy_gbps = context.get("env", {}).get("copy_gbps")
    ops_bench.run(str(dev), cfg["dtypes"], shapes=shapes, copy_gbps=copy_gbps, min_seconds=cfg["min_seconds"],
                  reps=cfg["reps"], warmup=cfg["warmup"], on_row=lambda row: part.add_row("rows", row))
    part.data["summary"] = ops_summary(part.data.get("rows", []))
    part.save()


def ops_summary(rows: list[dict]) -> dict:
    """Per op and backend: the median speed-up over eager (fwd+bwd) across shapes and dtypes,
    and the order in which ``auto`` should try the fused backends (fastest first). A row whose
    numbers did not match the float64 reference counts for nothing (its speed is of a wrong
    result) and is listed under ``wrong``."""
    import statistics
    per: dict[str, dict[str, list[float]]] = {}
    wrong: dict[str, list[str]] = {}
    for r in rows:
        sp = r.get("fwd+bwd_speedup")
        if r.get("matches_reference") is False:
            wrong.setdefault(r["op"], []).append(f"{r['backend']} {_fmt(r.get('shape'))} {r.get('dtype')}")
        elif r["backend"] != "torch" and isinstance(sp, float) and sp == sp:
            per.setdefault(r["op"], {}).setdefault(r["backend"], []).append(sp)
    out = {}
    for op, by in per.items():
        med = {b: statistics.median(v) for b, v in by.items()}
        out[op] = {"median_speedup": med, "fastest_first": sorted(med, key=med.get, reverse=True)}
    for op, which in wrong.items():
        out.setdefault(op, {"median_speedup": {}, "fastest_first": []})["wrong"] = which
    return out


# --------------------------------------------------------------------------- stage: conv
def stage_conv(part: Part, dry: bool, out: Path, context: dict) -> None:
    """ops.conv2d_eqlr's Triton kernel against cuDNN + the epilogue at every conv layer shape,
    and the per-layer table (ops.conv2d_eqlr.LAYER_TABLE) those figures give."""
    from . import ops as ops_bench
    dev = _device(dry, part)
    cfg = sizes(dry)["conv"]
    layers = ops_bench.conv_layer_shapes(cfg["resolution"], cfg["fmap_max"])
    if cfg["layers"]:  # the dry run: a few layers, one of each resampling
        picked = [layers[0]] + [next(s for s in layers if s["resample"] == r) for r in ("up", "down")]
        layers = picked + [s for s in layers if s not in picked][:max(0, cfg["layers"] - len(picked))]
    part.data["layers"] = layers
    part.data["layer_table"] = []

    def on_row(row):  # the table grows with every measured pair, so a stage cut at its cap keeps it
        part.data.setdefault("rows", []).append(row)
        for key, fused in (("layer_table", 1), ("layer_table_triton_epilogue_backward", 2),
                           ("layer_table_autotuned", 3)):
            part.data[key] = [list(k) + [v] for k, v in
                              ops_bench.layer_table(part.data["rows"], layers, cfg["dtype"], fused).items()]
        part.save()
        print(json.dumps(row, default=str)[:400], flush=True)
    ops_bench.conv_rows(str(dev), cfg["resolution"], cfg["fmap_max"], cfg["batch"], cfg["dtype"], layers,
                        cfg["reps"], cfg["warmup"], cfg["min_seconds"], on_row=on_row)


# --------------------------------------------------------------------------- stage: train
def stage_train(part: Part, dry: bool, out: Path, context: dict) -> None:
    from . import train_step
    dev = _device(dry, part)
    cfg = sizes(dry)["train"]
    part.data["modes"] = train_step.MODES
    for res, batch, modes, phases in cfg["configs"]:
        if dev.type != "cuda" and "cuda" in modes:
            modes = tuple(m for m in modes if m != "cuda")
            part.data.setdefault("skipped", []).append(f"{res} px batch {batch}: mode cuda (CUDA-only)")
        train_step.run((res,), ("bfloat16",), str(dev), net_resolution=cfg["net_resolution"],
                       fmap_max=cfg["fmap_max"], modes=modes, batches=(batch,), phases=phases, reps=cfg["reps"],
                       warmup=cfg["warmup"], on_row=lambda row: part.add_row("rows", row))
    # after the step rows, which the cap must not cut: a failure is recorded, not fatal, and a
    # stage killed at its cap leaves "started" (its training part is bounded by max_seconds)
    part.data["trainer_loop"] = {"error": "started, not finished (the stage's cap?)"}
    part.save()
    try:
        part.data["trainer_loop"] = train_step.trainer_loop(device=str(dev), **cfg["loop"])
        print(json.dumps(part.data["trainer_loop"], default=str)[:400], flush=True)
    except Exception as exc:  # noqa: BLE001
        part.data["trainer_loop"] = {"error": f"{type(exc).__name__}: {exc}"}
    part.save()


# --------------------------------------------------------------------------- stage: fid
def stage_fid(part: Part, dry: bool, out: Path, context: dict) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from . import fid as fid_bench
    from ..data.phantom import render
    from ..fid.compute import FeatureExtractor
    dev = _device(dry, part)
    cfg = sizes(dry)["fid"]
    part.data["weights"] = "random (timings do not depend on them)"
    exact = FeatureExtractor(None, True, "exact", str(dev), cfg["batch"], 0, progress=False)
    fast = FeatureExtractor(None, True, "fast", str(dev), cfg["batch"], 0, progress=False)
    u8 = torch.randint(0, 256, (cfg["batch"], cfg["size"], cfg["size"]), dtype=torch.uint8, device=dev)
    for row in fid_bench.preprocess_rows(u8, ("torch", "triton"), cfg["warmup"], 2 * cfg["reps"]):
        part.add_row("rows", row)
    for row in fid_bench.inception_rows(exact, fast, u8, cfg["warmup"], cfg["reps"]):
        part.add_row("rows", row)
    del u8
    # fast mode's deviation on chest phantoms (rendered small, upsampled on the device)
    n = cfg["accuracy_images"]
    small = torch.from_numpy(np.stack([render(64, seed)[0] for seed in range(n)])).unsqueeze(1).to(dev)
    images = torch.cat([(F.interpolate(small[i:i + 64], size=(cfg["size"], cfg["size"]), mode="bilinear",
                                       align_corners=False)[:, 0].clamp(0, 1) * 255).round().to(torch.uint8)
                        for i in range(0, n, 64)])
    part.data["fast_mode_accuracy"] = fid_bench.fast_mode_accuracy(exact, fast, images, cfg["batch"])
    part.save()
    del images, small, exact, fast
    m_rows, moments = fid_bench.moments_rows(cfg["moment_n"], dev, dim=cfg["dim"])
    for row in m_rows:
        part.add_row("rows", row)
    f_rows, extra = fid_bench.frechet_rows(moments.stats(), dev, scipy_baseline=cfg["scipy"])
    for row in f_rows:
        part.add_row("rows", row)
    part.data.update(extra)
    part.save()
    del moments
    for row in fid_bench.masked_moments_rows(cfg["masked_n"], cfg["masked_dim"], dev,
                                             exact_below=cfg["masked_exact_below"]):
        part.add_row("masked_moments", row)


# --------------------------------------------------------------------------- stage: knn
def stage_knn(part: Part, dry: bool, out: Path, context: dict) -> None:
    from . import fid as fid_bench
    dev = _device(dry, part)
    cfg = sizes(dry)["knn"]
    for row in fid_bench.knn_rows(cfg["n"], cfg["dim"], dev, check=cfg["check"]):
        part.add_row("rows", row)


# --------------------------------------------------------------------------- stage: sampling
def stage_sampling(part: Part, dry: bool, out: Path, context: dict) -> None:
    import torch

    from . import lco as lco_bench
    from . import sampling as sampling_bench
    from ..nn import Generator, NetworkConfig
    from ..nn.classifier import ChestClassifier, ClassifierConfig
    dev = _device(dry, part)
    cfg = sizes(dry)["sampling"]
    amp = None if dry else "bf16"
    res = sampling_bench.run(resolution=cfg["resolution"], n=cfg["n"], batch=cfg["batch"], device=str(dev),
                             amp=amp, fmap_max=cfg["fmap_max"])
    for row in res["rows"]:
        part.add_row("rows", row)
    torch.manual_seed(0)
    G = Generator(NetworkConfig(resolution=cfg["resolution"], fmap_max=cfg["fmap_max"])).to(dev).eval()
    G.requires_grad_(False)
    C = ChestClassifier(ClassifierConfig(input_size=cfg["classifier_size"], width=cfg["classifier_width"]))
    C = C.to(dev).eval().requires_grad_(False)
    row = lco_bench.lco_speed(G, C, cfg["lco_batch"], cfg["lco_steps"],
                              amp_dtype=torch.bfloat16 if amp == "bf16" else None)
    row.update(resolution=cfg["resolution"], classifier=f"resnet18 (width {cfg['classifier_width']}) at "
               f"{cfg['classifier_size']} px", amp=amp or "fp32")
    part.data["lco"] = row
    part.save()


STAGE_FUNCS = {"env": stage_env, "tests": stage_tests, "ops": stage_ops, "conv": stage_conv, "train": stage_train,
               "fid": stage_fid, "knn": stage_knn, "sampling": stage_sampling}


# --------------------------------------------------------------------------- the driver
def _run_stage(name: str, dry: bool, out: Path, work: Path, timeout: float, log) -> dict:
    """Run one stage in its own process (own session, so a timeout kills all it started)."""
    part_path = work / f"{name}.json"
    part_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "xrayforge.bench.gpu_check", "--stage", name, "--part", str(part_path),
           "--out", str(out), "--context", str(work / "context.json")] + (["--dry-run"] if dry else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry:  # Triton kernels are defined at import: the interpreter must be on before that
        env["TRITON_INTERPRET"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=ROOT)
    tail: deque[str] = deque(maxlen=30)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            log(f"  [{name}] {line.rstrip()}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = "passed"
    try:
        rc = proc.wait(timeout=timeout)
        if rc != 0:
            status = "failed"
    except subprocess.TimeoutExpired:
        status = "timed out"
    try:  # always: a stage's leftover children must not hold the GPU into the next stage
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    reader.join(timeout=10)  # the pipe closes once every process of the group is gone
    result = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "cap_seconds": round(timeout)}
    tail = list(tail) if not reader.is_alive() else []  # never read it while the reader writes
    if status == "failed":
        errs = [ln for ln in tail if ln.strip()]
        result["error"] = errs[-1] if errs else f"exit code {proc.returncode}"
        result["output_tail"] = tail[-12:]
    elif status == "timed out":
        result["error"] = f"killed after {timeout:.0f} s (its cap); partial results kept"
    try:
        result["data"] = json.loads(part_path.read_text())
    except (OSError, ValueError):
        result["data"] = {}
    # its data now lives in the report: a run killed later (past the machine's limit) must not leave
    # every earlier stage's part in --out, past the 8 files a device returns (5 + .setup.json +
    # .work/context.json + the running stage's part is the most there can be)
    part_path.unlink(missing_ok=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xrayforge.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default $OUT, else gpu-check/)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    p.add_argument("--only", default=None, help=f"comma list of stages to run, from {', '.join(STAGES)}")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all stages together (default 420 on a GPU, 280 in the dry run); "
                        "a stage gets min(its cap, what is left)")
    p.add_argument("--setup", default=None, help="JSON written by gpu_check.sh: install and build status")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="instead of running: combine gpu_check.json files of several windows (or --only "
                        "reruns), later files winning for the stages they ran, into --out")
    # internal: one stage in this process
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--context", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or "gpu-check")
    if not args.stage and (out / "gpu_check.json").exists():  # never replace an earlier run's report
        p.error(f"{out} already holds a gpu_check.json (an earlier run); choose a new --out "
                "(--merge combines runs)")
    out.mkdir(parents=True, exist_ok=True)

    if args.merge:
        reports = []
        for f in args.merge:
            try:
                reports.append(json.loads(Path(f).read_text()))
            except (OSError, ValueError) as exc:
                p.error(f"--merge: {f}: not a readable gpu_check.json ({exc})")
            if "stages" not in reports[-1]:
                p.error(f"--merge: {f}: not a gpu_check report (no 'stages')")
        report = merge_reports(reports)
        write_report(report, out)
        print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} from {len(args.merge)} reports")
        return 0
    if args.stage:
        part = Part(Path(args.part))
        context = json.loads(Path(args.context).read_text()) if args.context and Path(args.context).is_file() else {}
        STAGE_FUNCS[args.stage](part, args.dry_run, out, context)
        return 0

    only = STAGES
    if args.only:
        only = tuple(s.strip() for s in args.only.split(",") if s.strip())
        bad = [s for s in only if s not in STAGES]
        if bad:
            p.error(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    caps = DRY_CAPS if args.dry_run else CAPS
    budget = args.budget or (280.0 if args.dry_run else 420.0)
    log_path = out / "gpu_check.log"
    log_file = open(log_path, "a", encoding="utf-8")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    work = out / ".work"
    work.mkdir(exist_ok=True)
    report = {"check": "gpu_check", "dry_run": args.dry_run,
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "budget_seconds": budget, "setup": _read_json(args.setup), "commit": commit()["commit"], "stages": {}}
    context: dict = {}
    t_start = time.perf_counter()
    for name in STAGES:
        left = budget - (time.perf_counter() - t_start)
        if name not in only:
            report["stages"][name] = {"status": "skipped", "error": "not in --only"}
        elif left < MIN_USEFUL:
            report["stages"][name] = {"status": "skipped", "error": f"budget spent ({left:.0f} s left)"}
        else:
            (work / "context.json").write_text(json.dumps(context, default=str))
            later = [n for n in STAGES[STAGES.index(name) + 1:] if n in only]
            cap = min(caps[name], max(left - FLOOR * len(later), MIN_USEFUL))
            log(f"== stage {name} (cap {cap:.0f} s)")
            res = _run_stage(name, args.dry_run, out, work, cap, log)
            log(f"== stage {name}: {res['status']} in {res['seconds']} s" + (f" — {res['error']}" if res.get("error") else ""))
            report["stages"][name] = res
            context[name] = res.get("data", {})
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        write_report(report, out)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({report['total_seconds']} s)")
    log_file.close()
    failed = [n for n, s in report["stages"].items() if s["status"] in ("failed", "timed out")]
    return 1 if failed else 0


def merge_reports(reports: list[dict]) -> dict:
    """One report from several runs: each stage from the last run that did not skip it, marked
    with that run's commit and start time (the environment of different runs may differ)."""
    if not reports:
        raise ValueError("nothing to merge")
    merged = {"check": "gpu_check", "dry_run": any(r.get("dry_run") for r in reports),
              "started": reports[-1]["started"], "merged_from": [], "stages": {}}
    for r in reports:
        env = dict(r["stages"].get("env", {}).get("data", {}).get("environment", {}))
        env["commit"] = env.get("commit") or r.get("commit")  # a run without the env stage
        merged["merged_from"].append({"started": r["started"], "commit": env.get("commit"),
                                      "ran": [n for n, s in r["stages"].items() if s.get("status") != "skipped"],
                                      "setup": r.get("setup"), "total_seconds": r.get("total_seconds")})
        for name, stage in r["stages"].items():
            if stage.get("status") != "skipped" or name not in merged["stages"]:
                merged["stages"][name] = dict(stage, commit=env.get("commit"), run_started=r["started"])
    merged["setup"] = reports[-1].get("setup")
    return merged


def _read_json(path) -> dict | None:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"could not read {path}: {exc}"}


def write_report(report: dict, out: Path) -> None:
    write_text_atomic(out / "gpu_check.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(out / "gpu_check.md", render_markdown(report))


# --------------------------------------------------------------------------- the Markdown report
def _fmt(v, digits=3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return "×".join(str(x) for x in v)
    return str(v)


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return lines


def render_markdown(report: dict) -> str:
    st = report["stages"]
    env = st.get("env", {}).get("data", {})
    e = env.get("environment", {})
    # without the env stage (--only): the device the stages recorded
    recorded = [s.get("data", {}) for s in st.values() if s.get("data", {}).get("device")]
    dev = e.get("device", {}).get("name") or (recorded[0]["device"]["name"] if recorded else "?")
    v = e if e else (recorded[0].get("versions", {}) if recorded else {})
    commit = e.get("commit") or report.get("commit")
    lines = [f"# GPU check — {dev}" + (" (DRY RUN on the CPU: no GPU figure)" if report["dry_run"] else ""),
             "", f"{report['started'][:10]}; commit {commit or '?'}; torch {v.get('torch')}, "
             f"triton {v.get('triton')}, CUDA {v.get('cuda')}; {e.get('nvidia_smi', '')}", ""]
    setup = report.get("setup") or {}
    if setup:
        lines += ["Setup: " + "; ".join(f"{k}: {v}" for k, v in setup.items()), ""]
    if "copy_gbps" in env:
        lines += [f"Measured device-to-device copy: **{env['copy_gbps']:.0f} GB/s** (read + write); "
                  f"bf16 matmul {env.get('matmul_bf16_tflops', float('nan')):.0f} TFLOP/s.", ""]
    skipped = [f"{n}: {x}" for n, s in st.items() for x in s.get("data", {}).get("skipped", [])]
    if skipped:
        lines += ["Skipped parts: " + "; ".join(skipped), ""]
    if report.get("merged_from"):
        lines += ["Merged from runs: " + "; ".join(f"{m['started']} (commit {str(m['commit'])[:7]}: "
                                                   f"{', '.join(m['ran'])})" for m in report["merged_from"]), ""]
    lines += ["## Stages", ""] + _table([{"stage": n, **{k: (str(v)[:7] if k == "commit" and v else v)
                                                         for k, v in s.items() if k != "data"}}
                                          for n, s in st.items()],
                                         [("stage", "stage"), ("status", "status"), ("seconds", "s"),
                                          ("cap_seconds", "cap s"), ("commit", "commit"), ("error", "error")]) + [""]
    tests = st.get("tests", {}).get("data", {})
    if tests.get("per_pair"):
        lines += ["## Kernel validation (gpu-marked tests)", "",
                  f"{tests.get('totals')}; validated: {', '.join(tests.get('validated', [])) or 'none'}", ""]
        lines += _table([{"pair": k, **v} for k, v in sorted(tests["per_pair"].items())],
                        [("pair", "op/backend"), ("passed", "passed"), ("failed", "failed"), ("skipped", "skipped")])
        if tests.get("failed_tests"):
            lines += ["", "Failed: " + ", ".join(tests["failed_tests"][:30])]
        lines += [""]
    ops_rows = st.get("ops", {}).get("data", {}).get("rows", [])
    if ops_rows:
        lines += ["## Ops (fwd / fwd+bwd; GB/s of minimum traffic; % of measured copy)", ""]
        lines += _table([dict(r, fwd_pct=_pct(r.get("fwd_copy_frac")), fb_pct=_pct(r.get("fwd+bwd_copy_frac")),
                              err=_row_problem(r)) for r in ops_rows],
                        [("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("backend", "backend"),
                         ("max_err", "max err"), ("max_grad_err", "grad rel err"),
                         ("fwd_ms", "fwd ms"), ("fwd_gbps", "fwd GB/s"),
                         ("fwd_pct", "fwd % copy"), ("fwd_speedup", "fwd ×eager"), ("fwd+bwd_ms", "f+b ms"),
                         ("fwd+bwd_gbps", "f+b GB/s"), ("fb_pct", "f+b % copy"),
                         ("fwd+bwd_speedup", "f+b ×eager"), ("err", "error")]) + [""]
    conv = st.get("conv", {}).get("data", {})
    if conv.get("rows"):
        lines += ["## Fused equalized-lr convolutions (ops.conv2d_eqlr vs cuDNN + epilogue; TFLOP/s of the plain "
                  "conv, f+b counted 3×)", ""]
        lines += _table([dict(r, problem=_row_problem(r)) for r in conv["rows"]],
                        [("shape", "layer"), ("batch", "batch"), ("dtype", "dtype"),
                                       ("variant", "variant"), ("max_err", "max err"),
                                       ("max_grad_err", "grad rel err"), ("fwd_ms", "fwd ms"),
                                       ("fwd_tflops", "fwd TFLOP/s"), ("fwd_peak_frac", "fwd peak frac"),
                                       ("fwd_gbps", "fwd GB/s"), ("fwd_hbm_frac", "fwd HBM frac"),
                                       ("fwd_speedup", "fwd ×cuDNN"), ("fwd+bwd_ms", "f+b ms"),
                                       ("fwd+bwd_tflops", "f+b TFLOP/s"), ("fwd+bwd_peak_frac", "f+b peak frac"),
                                       ("fwd+bwd_speedup", "f+b ×cuDNN"),
                                       ("gp_ms", "GP ms"), ("gp_speedup", "GP ×cuDNN"),
                                       ("problem", "error")]) + [""]
        table = conv.get("layer_table") or []
        lines += [f"Per-layer table (layers where the fused kernel cost less forward + backward, plus the gradient "
                  f"penalty for D's layers): {len(table)} of "
                  f"{len(conv.get('layers', []))}" + "".join(f"\n- {row}" for row in table), ""]
        for key, what in (("layer_table_triton_epilogue_backward",
                            "with the Triton epilogue backward (ops.conv2d_eqlr.EPILOGUE_BACKWARD = 'triton')"),
                           ("layer_table_autotuned", "with autotuned tiles (ops.conv2d_eqlr.AUTOTUNE = True)")):
            alt = conv.get(key)
            if alt is not None:
                lines += [f"The same {what}: {len(alt)} of {len(conv.get('layers', []))}"
                          + "".join(f"\n- {row}" for row in alt), ""]
        tuned = [(r["shape"], r["tuned_blocks"]) for r in conv.get("rows", []) if r.get("tuned_blocks")]
        if tuned:
            lines += ["Tiles the autotuner chose (BM, BN, BK, warps, stages):"
                      + "".join(f"\n- {shape}: {blocks}" for shape, blocks in tuned), ""]
    train_rows = st.get("train", {}).get("data", {}).get("rows", [])
    if train_rows:
        lines += ["## Training step (WGAN-GP, G + D + GP + EMA)", ""]
        lines += _table(train_rows, [("resolution", "px"), ("dtype", "dtype"), ("batch", "batch"), ("mode", "mode"),
                                     ("img_s", "img/s"), ("speedup", "×baseline"), ("peak_gib", "peak GiB"),
                                     ("gib_per_img", "GiB/img"), ("tflops", "TFLOP/s"), ("mfu", "MFU"),
                                     ("error", "error")]) + [""]
        phased = [r for r in train_rows if r.get("phases_ms")]
        if phased:
            names = list(dict.fromkeys(k for r in phased for k in r["phases_ms"]))
            lines += ["Per-phase ms per step (CUDA events):", ""]
            lines += _table([{"cfg": f"{r['resolution']} px b{r['batch']} {r['mode']}", **r["phases_ms"]} for r in phased],
                            [("cfg", "config")] + [(n, n) for n in names]) + [""]
    loop = st.get("train", {}).get("data", {}).get("trainer_loop")
    if loop:
        if "error" in loop:
            lines += [f"Trainer loop: failed ({loop['error']}).", ""]
        else:
            lines += [f"Trainer loop ({loop['network']}, {loop['resolution']} px, batch {loop['batch']}, {loop['amp']}): "
                      f"{loop['loop_img_s']:.0f} img/s against {loop['step_img_s']:.0f} img/s for its bare step "
                      f"({loop['loop_share_of_step']:.0%}; the loop adds {loop['loop_overhead_ms_per_step']:.1f} ms "
                      "per step).", ""]
    fid = st.get("fid", {}).get("data", {})
    if fid.get("rows"):
        lines += ["## FID pipeline (random Inception weights)", ""]
        lines += _table(fid["rows"], [("stage", "stage"), ("variant", "variant"), ("batch", "batch"),
                                      ("img_s", "img/s"), ("ms", "ms"), ("gbps", "GB/s"), ("speedup", "×baseline"),
                                      ("max_abs_diff", "max diff"), ("error", "error")]) + [""]
        acc = fid.get("fast_mode_accuracy")
        if acc:
            lines += [f"Fast mode vs exact on {acc['images']} phantoms: FID(fast, exact) = {acc['fid_fast_vs_exact']:.3g} "
                      f"(exact half vs half: {acc['fid_exact_half_vs_half']:.3g}); feature relative error median "
                      f"{acc['feature_relative_error_median']:.2e}, max {acc['feature_relative_error_max']:.2e}.", ""]
        if "frechet_relative_difference_vs_scipy" in fid:
            lines += [f"Fréchet vs scipy sqrtm: {fid['frechet_relative_difference_vs_scipy']:.2e} relative.", ""]
    if fid.get("masked_moments"):
        lines += ["## Masked feature moments (K = 1: all rows; K = 15: all + 14 findings at ChestX-ray14 prevalence)", ""]
        lines += _table(fid["masked_moments"], [("stage", "stage"), ("variant", "variant"), ("rows", "rows"),
                                                ("ms", "ms"), ("tflops", "TFLOP/s"), ("k15_over_k1", "K15 / K1"),
                                                ("max_rel_err_m2", "m2 rel err"), ("max_rel_err_mean", "mean rel err"),
                                                ("error", "error")]) + [""]
    knn_rows = st.get("knn", {}).get("data", {}).get("rows", [])
    if knn_rows:
        lines += ["## k nearest neighbours and precision / recall / density / coverage", ""]
        lines += _table(knn_rows, [("stage", "stage"), ("variant", "variant"), ("ms", "ms"), ("tflops", "TFLOP/s"),
                                   ("same_neighbours", "same neighbours"), ("max_rel_diff", "max rel diff"),
                                   ("precision", "precision"), ("recall", "recall"), ("density", "density"),
                                   ("coverage", "coverage"), ("error", "error")]) + [""]
    samp = st.get("sampling", {}).get("data", {})
    if samp.get("rows"):
        lines += ["## Sampling", ""]
        lines += _table(samp["rows"], [("resolution", "px"), ("amp", "precision"), ("batch", "batch"),
                                       ("encode_threads", "PNG threads"), ("img_s", "img/s")]) + [""]
        lco = samp.get("lco")
        if lco:
            lines += [f"LCO at {lco['resolution']} px ({lco['classifier']}, {lco['amp']}): {lco['steps_s']:.3g} steps/s "
                      f"on a batch of {lco['batch']} ({lco['latent_steps_s']:.3g} latent-steps/s).", ""]
    return "\n".join(lines) + "\n"


def _pct(frac):
    return None if frac is None else 100.0 * frac


def _row_problem(r: dict) -> str | None:
    """What the error column of an ops or conv row says: WRONG where the path's numbers did not
    match the float64 reference (its timings are of a wrong result), then any failure."""
    said = [r.get(k) for k in ("error", "grad_error", "fwd_error", "fwd+bwd_error") if r.get(k)]
    if r.get("matches_reference") is False:
        said.insert(0, "WRONG: outside the tolerance against float64")
    return "; ".join(said) or None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
