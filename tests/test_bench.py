"""The benchmarks measure what they say: byte counts, correctness verdicts beside the timings,
baselines of the same arithmetic, and the GPU window's output contract (CPU-only checks)."""
import json
import stat
import sys

import pytest
import torch

from xrayforge.bench import fid as fid_bench
from xrayforge.bench import gpu_check
from xrayforge.bench import ops as ops_bench
from xrayforge.fid.features import conv_tf32_allowed


# ---------------------------------------------------------------- FID preprocessing: bytes moved
@pytest.mark.parametrize("side,rows_read", [(1024, 598), (64, 64)])
def test_preprocess_gbps_counts_the_source_rows_bilinear_reads(side, rows_read):
    # shrinking 1024 -> 299, pytorch-fid's bilinear taps land on 598 of the 1024 rows: the GB/s
    # counted every stored pixel as read, 1.45x the bytes the kernel can move (2.8 TB/s reported
    # where the traffic gives 1.96); growing 64 -> 299 reads every row
    u8 = torch.randint(0, 256, (1, side, side), dtype=torch.uint8)
    row, = fid_bench.preprocess_rows(u8, backends=("torch",), warmup=0, reps=1)
    nbytes = row["gbps"] * row["ms"] * 1e6
    assert nbytes == pytest.approx(rows_read * side + 299 * 299 * 4, rel=1e-9)


def test_preprocess_bytes_follow_the_kernels_taps():
    from xrayforge.fid.preprocess import reference
    # every row the reference's output depends on is counted: perturb one source row at a time
    side = 40
    base = torch.zeros(1, side, side, dtype=torch.uint8)
    out0 = reference(base, channels=1, size=13)
    used = [r for r in range(side)
            if not torch.equal(reference(base.index_fill(1, torch.tensor([r]), 255), channels=1, size=13), out0)]
    counted = (fid_bench.preprocess_bytes(1, 1, side, side, 1, size=13) - 13 * 13 * 4) // side
    assert len(used) <= counted <= len(used) + 2  # taps of zero weight may be read, never fewer rows


# ---------------------------------------------------------------- FID: Inception baselines
def test_inception_exact_mode_is_compared_with_an_ieee_fp32_baseline(monkeypatch):
    # PyTorch's default lets cuDNN run float32 convolutions as TF32: the "pytorch-fid equivalent
    # (fp32)" row ran TF32 while ours exact runs IEEE float32 (features.ieee_fp32), so the two
    # timed different arithmetic under one label
    seen = {}

    class Model(torch.nn.Module):
        def forward(self, x):
            seen.setdefault("tf32", []).append(conv_tf32_allowed())
            return x.mean((2, 3))

    class Extractor:
        device = torch.device("cuda")
        model = Model()

        def features(self, u8):
            seen.setdefault("features", []).append(conv_tf32_allowed())
            return u8.float().mean((1, 2))[:, None]

    times = iter([40.0, 50.0, 25.0, 10.0])

    def fake_time(fn, dev, **kw):
        fn()
        return next(times)
    monkeypatch.setattr(fid_bench, "time_fn", fake_time)
    monkeypatch.setattr(fid_bench._backend, "resolve_for_device", lambda *a, **k: "triton")
    before = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        rows = fid_bench.inception_rows(Extractor(), Extractor(), torch.zeros(2, 8, 8, dtype=torch.uint8))
        restored = torch.backends.cudnn.conv.fp32_precision
    finally:
        torch.backends.cudnn.conv.fp32_precision = before
    names = [r["variant"] for r in rows]
    assert "TF32" in names[0] and "IEEE fp32" in names[1]
    assert seen["tf32"] == [True, False]  # the IEEE baseline really ran without TF32
    exact, fast = rows[2], rows[3]
    assert exact["baseline"] == names[1] and exact["speedup"] == pytest.approx(50.0 / 25.0)
    assert fast["baseline"] == names[0] and fast["speedup"] == pytest.approx(40.0 / 10.0)
    assert restored == "tf32"  # the settings are put back


# ---------------------------------------------------------------- ops: a wrong kernel says so
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.5


def _broken_call(original):
    def call(op, x, bias, backend):
        if backend == "wrong-grad":  # the forward right, the backward 50% off
            return _ScaleGrad.apply(original(op, x, bias, "torch"))
        if backend == "wrong-fwd":
            return original(op, x, bias, "torch") + 0.25  # past bf16 rounding too
        if backend == "same":
            return original(op, x, bias, "torch")
        return original(op, x, bias, backend)
    return call


def test_ops_rows_say_when_a_fast_path_gives_wrong_numbers(monkeypatch):
    # only the forward was compared (and with no verdict): a kernel whose backward is wrong posted
    # its fwd+bwd speed-up like any other, and ops_summary ranked it for auto
    monkeypatch.setattr(ops_bench, "_call", _broken_call(ops_bench._call))
    res = ops_bench.run("cpu", ("float32", "bfloat16"), backends=["same", "wrong-grad", "wrong-fwd"],
                        shapes={"pixel_norm": [(2, 8, 3, 3)], "bias_lrelu": [(2, 4, 3, 3)]},
                        reps=1, warmup=0, min_seconds=0.0)
    rows = {(r["op"], r["dtype"], r["backend"]): r for r in res["rows"]}
    for op in ("pixel_norm", "bias_lrelu"):
        for dtype in ("float32", "bfloat16"):
            ref = rows[(op, dtype, "torch")]
            assert "matches_reference" not in ref and ref["max_grad_err"] >= 0
            assert rows[(op, dtype, "same")]["matches_reference"] is True
            assert rows[(op, dtype, "wrong-grad")]["matches_reference"] is False
            assert rows[(op, dtype, "wrong-grad")]["max_grad_err"] == pytest.approx(0.5, rel=0.05)
            assert rows[(op, dtype, "wrong-fwd")]["matches_reference"] is False
            assert all(rows[(op, dtype, b)]["fwd+bwd_ms"] > 0 for b in ("same", "wrong-grad"))  # still timed
    for r in res["rows"]:  # wrong ones are timed: fake the speed-ups to see the summary drop them
        r["fwd+bwd_speedup"] = {"torch": 1.0, "same": 1.2, "wrong-grad": 9.0, "wrong-fwd": 8.0}[r["backend"]]
    summary = gpu_check.ops_summary(res["rows"])["pixel_norm"]
    assert summary["fastest_first"] == ["same"] and len(summary["wrong"]) == 4
    md = gpu_check.render_markdown({"dry_run": True, "started": "2026-01-01T00:00:00",
                                    "stages": {"ops": {"status": "passed", "data": {"rows": res["rows"]}}}})
    wrong_lines = [ln for ln in md.splitlines() if "WRONG" in ln]
    assert len(wrong_lines) == 8 and all("| same |" not in ln for ln in wrong_lines)


def test_conv_rows_check_gradients_and_layer_table_drops_wrong_rows(monkeypatch):
    import xrayforge.ops as xops
    original = xops.conv2d_eqlr

    def conv(x, weight, bias=None, *, backend=None, **kw):
        if backend == "wrong-grad":
            return _ScaleGrad.apply(original(x, weight, bias, backend="torch", **kw))
        return original(x, weight, bias, backend=backend, **kw)
    monkeypatch.setattr(xops, "conv2d_eqlr", conv)
    variants = (ops_bench.CONV_VARIANTS[0], ("fused torch", "torch", "torch", False),
                ("wrong grad", "wrong-grad", "torch", False))
    monkeypatch.setattr(ops_bench, "CONV_VARIANTS", variants)
    monkeypatch.setattr(ops_bench, "CONV_PASSES", (variants,))
    layers = [dict(cin=4, cout=4, kernel=3, resample=None, activation="lrelu", size=8, fused=False)]
    rows = ops_bench.conv_rows("cpu", batch=2, dtype="float32", layers=layers, reps=1, warmup=0, min_seconds=0.0)
    by = {r["variant"]: r for r in rows}
    assert not [r for r in rows if "error" in r]
    assert "matches_reference" not in by["cudnn + epilogue"] and by["cudnn + epilogue"]["max_grad_err"] < 1e-5
    assert by["fused torch"]["matches_reference"] is True
    assert by["wrong grad"]["matches_reference"] is False and by["wrong grad"]["max_grad_err"] > 0.4
    # the wrong variant "wins" on time: the table must still not send the layer to it
    for r in rows:
        r["fwd+bwd_ms"], r["gp_ms"] = (1.0, 1.0) if r["variant"] == "wrong grad" else (2.0, 2.0)
    assert ops_bench.layer_table(rows, layers, "float32", fused=2) == {}
    by["wrong grad"]["matches_reference"] = True
    assert ops_bench.layer_table(rows, layers, "float32", fused=2)


# ---------------------------------------------------------------- GPU window: files in --out
FAKE_STAGE = """#!/bin/bash
# stands in for `python -m xrayforge.bench.gpu_check --stage NAME --part PATH --out OUT ...`
while [ $# -gt 0 ]; do
  case "$1" in --stage) stage=$2; shift 2 ;; --part) part=$2; shift 2 ;; --out) out=$2; shift 2 ;; *) shift ;; esac
done
echo '{}' > "$part"
n=$(find "$out" -type f | wc -l)
echo "{\\"stage\\": \\"$stage\\", \\"files_in_out\\": $n}" > "$part"
"""


def test_a_killed_gpu_window_leaves_at_most_eight_files(tmp_path, monkeypatch):
    # each stage's part stayed in --out/.work until the run's end: a run killed in its last stage
    # (the machine's limit) left 8 parts + context.json + .setup.json + the 5 reports, and a device
    # returns at most 8 files, so which came back was chance
    fake = tmp_path / "python"
    fake.write_text(FAKE_STAGE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake))
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    seen = {n: s["data"]["files_in_out"] for n, s in report["stages"].items()}
    assert list(seen) == list(gpu_check.STAGES)
    # here: no gpu_tests.xml, build.log or .setup.json (3 of the 8 a real run may hold)
    assert max(seen.values()) + 3 <= 8, seen
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]


def test_a_bf16_kernel_off_by_one_channel_is_not_within_the_tolerance():
    """Pixel norm over C - 1 channels instead of C at C = 32 is 1.6% off; bf16 eager's own error
    against float64 is about half a bf16 rounding (2^-8): twice that, or the floor, must not hold it.
    The rule was 2 x eager + 4 eps (3.9%), which passed it."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 8, 8, dtype=torch.float64)
    exact = x / (x.square().mean(1, keepdim=True) + 1e-8).sqrt()
    wrong = x / (x.square().sum(1, keepdim=True) / 31 + 1e-8).sqrt()
    xb = x.bfloat16()
    eager = (xb / (xb.square().mean(1, keepdim=True) + 1e-8).sqrt()).double()
    scale = exact.abs().max().item()
    rel = lambda y: ((y - exact).abs().max() / scale).item()  # noqa: E731
    floor = ops_bench.tolerance_floor(torch.bfloat16)
    assert ops_bench.matches_reference(rel(eager.bfloat16().double()), rel(eager), floor)
    assert not ops_bench.matches_reference(rel(wrong.bfloat16().double()), rel(eager), floor)


# ---------------------------------------------------------------- train step: rows are what they say
def test_train_step_refuses_a_dtype_it_would_not_run(monkeypatch, capsys):
    # build() gave bfloat16 autocast only to "bfloat16": any other name (float16, fp16) timed float32
    # under its own label in the JSON
    import xrayforge.bench.train_step as ts
    with pytest.raises(ValueError, match="float16"):
        ts.build(8, torch.device("cpu"), False, "float16", net_resolution=8, fmap_max=8)

    def no_run(*a, **k):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(ts, "run", no_run)
    monkeypatch.setattr(ts, "profile_step", no_run)
    for argv in (["--dtypes", "float32,float16"], ["--dtypes", "fp16", "--profile"], ["--batch", "0"],
                 ["--batches", "16,0"], ["--batches", "0", "--profile"]):
        with pytest.raises(SystemExit) as exc:
            ts.main(argv + ["--device", "cpu"])
        assert exc.value.code == 2, argv
        assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------- conv and kNN rows: what is counted and timed
def test_conv_rows_gbps_count_the_weight(monkeypatch):
    # the bytes were the activations alone: at 4 px a 512 -> 512 3x3 layer moves its 9.4 MB float32
    # weight against 0.5 MB of activations (batch 16, bf16), and GB/s and HBM frac read ~18x low
    monkeypatch.setattr(ops_bench, "CONV_PASSES", ((ops_bench.CONV_VARIANTS[0],),))
    s = dict(cin=8, cout=6, kernel=3, resample=None, activation="lrelu", size=4, fused=False)
    row, = ops_bench.conv_rows("cpu", batch=2, dtype="float32", layers=[s], reps=1, warmup=0, min_seconds=0.0)
    x, y, w = 2 * 8 * 4 * 4 * 4, 2 * 6 * 4 * 4 * 4, 8 * 6 * 9 * 4
    assert row["fwd_gbps"] * row["fwd_ms"] * 1e6 == pytest.approx(x + y + w, rel=1e-9)
    assert row["fwd+bwd_gbps"] * row["fwd+bwd_ms"] * 1e6 == pytest.approx(3 * (x + y + w), rel=1e-9)
    # the largest layers at 4 px: the weight is most of it
    _, fwd, _ = ops_bench._conv_costs(dict(s, cin=512, cout=512), 16, 2)
    assert fwd >= 512 * 512 * 9 * 4


def test_knn_rows_time_the_search_ops_knn_runs(monkeypatch):
    # ops.knn searches k + EXTRA_CANDIDATES candidates (then recomputes them exactly); the benchmark
    # searched k alone, fewer merge passes in the kernel than the op it names runs
    import importlib
    knn_mod = importlib.import_module("xrayforge.ops.knn")  # xrayforge.ops.knn is also the function
    asked = []
    original = knn_mod.reference

    def recording(queries, refs, k, *args, **kwargs):
        asked.append((len(refs), k))
        return original(queries, refs, k, *args, **kwargs)
    monkeypatch.setattr(knn_mod, "reference", recording)
    x = torch.randn(40, 8)
    knn_mod.knn(x, x, 3, exclude_self=True, backend="torch")
    op_k = asked[-1][1]
    asked.clear()
    rows = fid_bench.knn_rows(40, 8, torch.device("cpu"), k=3, variants=(("torch", None),), check=40,
                              prdc_backend=None)
    assert "error" not in rows[0], rows[0]
    assert asked and all(k == op_k for _, k in asked), (asked, op_k)


def test_bench_json_replaces_only_an_earlier_bench_json(tmp_path, capsys):
    """--json README.md (or a committed benchmarks/results file) was replaced by the suite's rows
    after the whole run; now any file but an earlier `bench --json` is refused before any work."""
    from xrayforge.cli import main as cli
    mine = tmp_path / "notes.md"
    mine.write_text("# my notes\n")
    script = tmp_path / "ops-cpu.json"  # what benchmarks/<name>.py writes: one suite's result, not bench's
    script.write_text(json.dumps({"benchmark": "ops", "rows": []}))
    for path in (mine, script):
        assert cli(["bench", "--suites", "data", "--device", "cpu", "-q", "--json", str(path)]) == 1
        assert f"{path}: exists and is not the JSON of an earlier `xrayforge bench --json`" in capsys.readouterr().err
    assert mine.read_text() == "# my notes\n" and json.loads(script.read_text())["benchmark"] == "ops"
    ours = tmp_path / "b.json"
    for _ in range(2):  # a new file, then its own earlier output replaced
        assert cli(["bench", "--suites", "data", "--device", "cpu", "-q", "--json", str(ours)]) == 0
        assert json.loads(ours.read_text())["data"]["rows"]


def test_bench_suites_with_spaces_or_named_twice_run_each_once(monkeypatch, capsys):
    """--suites "data, sampling" was refused as an unknown benchmark ' sampling', and "data,data" ran it twice."""
    import xrayforge.bench.suite as suite
    from xrayforge.cli import main as cli
    ran = []
    monkeypatch.setattr(suite, "run_suite", lambda suites, *a, **k: ran.append(list(suites)) or {})
    monkeypatch.setattr(suite, "print_tables", lambda results: None)
    assert cli(["bench", "--suites", "data, sampling,data", "--device", "cpu", "-q"]) == 0
    assert ran == [["data", "sampling"]]
    assert cli(["bench", "--suites", "data,nope", "--device", "cpu", "-q"]) == 2
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err


# ---------------------------------------------------------------- JSON: strict, and says what ran where
def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_results_json_is_strict_json_and_records_commit_and_settings(monkeypatch, tmp_path):
    # a fast path timed where eager's fwd+bwd failed got speedup = float("nan"), written as a bare NaN:
    # not JSON to any parser but Python's; and no file said which commit or settings it measured
    from xrayforge.bench import environment, write_results
    from xrayforge.bench.suite import save_json
    monkeypatch.setattr(ops_bench, "_call", _broken_call(ops_bench._call))
    original = ops_bench._make_call

    def eager_backward_fails(op, shape, dtype, device, backend, backward):
        if backend == "torch" and backward:
            raise RuntimeError("out of memory")
        return original(op, shape, dtype, device, backend, backward)
    monkeypatch.setattr(ops_bench, "_make_call", eager_backward_fails)
    res = ops_bench.run("cpu", ("float32",), backends=["same"], shapes={"pixel_norm": [(2, 8, 3, 3)]},
                        reps=1, warmup=0, min_seconds=0.0)
    same, = [r for r in res["rows"] if r["backend"] == "same"]
    assert same["fwd_speedup"] > 0 and same["fwd+bwd_speedup"] is None
    assert res["settings"]["dtypes"] == ["float32"] and res["settings"]["shapes"] == {"pixel_norm": [[2, 8, 3, 3]]}
    assert "commit" in environment() and "dirty" in environment()
    res["fwd_ratio_over_zero"] = float("inf")  # whatever a suite computes, the file stays JSON
    written = _strict_json(write_results("ops", res, tmp_path).read_text())
    assert written["fwd_ratio_over_zero"] is None and written["environment"]["commit"] == res["environment"]["commit"]
    save_json({"ops": (res, ops_bench.COLUMNS)}, tmp_path / "bench.json")
    assert _strict_json((tmp_path / "bench.json").read_text())["ops"]["settings"]["reps"] == 1


def test_ops_verdict_catches_a_wrong_bf16_backward_at_the_quick_shapes(monkeypatch):
    # at a leaky ReLU's kink a bf16 pre-activation rounded to the other side takes the other slope:
    # eager bf16's largest gradient error is ~0.56 of the scale at (4, 16, 128, 128), and twice that
    # passed a backward 50% off as matching float64
    monkeypatch.setattr(ops_bench, "_call", _broken_call(ops_bench._call))
    res = ops_bench.run("cpu", ("bfloat16",), backends=["same", "wrong-grad"],
                        shapes={"bias_lrelu": [ops_bench.CPU_SHAPES["bias_lrelu"][0]]},
                        reps=1, warmup=0, min_seconds=0.0)
    rows = {r["backend"]: r for r in res["rows"]}
    assert rows["same"]["matches_reference"] is True
    assert rows["wrong-grad"]["matches_reference"] is False
    assert rows["torch"]["grad_l2_err"] < 0.1 and rows["wrong-grad"]["grad_l2_err"] == pytest.approx(0.5, rel=0.05)


# ---------------------------------------------------------------- scripts: bad arguments, --help
def _script_modules():
    from xrayforge.bench import data as data_bench
    from xrayforge.bench import lco as lco_bench
    from xrayforge.bench import train_step as ts_bench
    return {"ops": ops_bench, "fid": fid_bench, "data": data_bench, "train_step": ts_bench, "lco": lco_bench}


@pytest.mark.parametrize("name,argv", [
    ("ops", ["--dtypes", "float64x"]), ("ops", ["--dtypes", "int8"]), ("ops", ["--backends", "nope"]),
    ("fid", ["--n", "-4"]), ("fid", ["--n", "2"]), ("fid", ["--batch", "0"]), ("fid", ["--moment-n", "0"]),
    ("fid", ["--workers", "-1"]), ("data", ["--n", "-1"]), ("data", ["--size", "100"]),
    ("train_step", ["--resolutions", "0"]), ("train_step", ["--resolutions", "16,abc"]),
    ("train_step", ["--resolutions", "128"]),
    ("lco", ["RUN", "C", "--targets", "auto", "--n", "0"]), ("lco", ["RUN", "C", "--targets", "auto", "--steps", "-1"]),
    ("lco", ["RUN", "C", "--targets", "auto", "--census", "-5"])])
def test_bench_scripts_refuse_bad_arguments_before_running(name, argv, monkeypatch, capsys):
    # an unknown dtype was torch's AttributeError, int8 torch.finfo's TypeError, an unknown backend a table of
    # empty rows; negative sizes ran until something deep failed (or hung)
    module = _script_modules()[name]

    def no_run(*a, **k):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(module, "run", no_run)
    with pytest.raises(SystemExit) as exc:
        module.main(argv + (["--device", "cpu"] if name != "data" else []))
    assert exc.value.code == 2
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ops", "fid", "data", "train_step", "lco"])
@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_bench_scripts_refuse_a_results_folder_that_is_a_file_before_running(name, where, tmp_path, monkeypatch,
                                                                           capsys):
    """--out naming a file (or a folder under one) failed in write_results, after the whole benchmark."""
    module = _script_modules()[name]
    (tmp_path / "notes.txt").write_text("keep")
    out = tmp_path / "notes.txt" / ("" if where == "file" else "results")

    def no_run(*a, **k):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(module, "run", no_run)
    argv = (["RUN", "C", "--targets", "auto"] if name == "lco" else []) + ["--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        module.main(argv + (["--device", "cpu"] if name != "data" else []))
    assert exc.value.code == 2
    assert "notes.txt: is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("name", ["ops", "fid", "data", "train_step", "lco"])
def test_every_bench_script_option_is_explained_by_help(name):
    p = _script_modules()[name].parser()
    silent = [a.option_strings or a.dest for a in p._actions if not a.help]
    assert not silent, silent


def test_fid_moments_and_frechet_rows_carry_their_ratio():
    # the moment and Fréchet rows timed ours and numpy / scipy side by side, but no ratio was computed,
    # and the suite's table had no ×baseline column for the ratios the other rows carry
    rows, moments = fid_bench.moments_rows(300, torch.device("cpu"), dim=16, chunk=100)
    assert rows[0]["speedup"] == pytest.approx(rows[1]["ms"] / rows[0]["ms"]) and rows[0]["baseline"] == rows[1]["variant"]
    f_rows, _ = fid_bench.frechet_rows(moments.stats(), torch.device("cpu"))
    assert f_rows[0]["speedup"] == pytest.approx(f_rows[1]["ms"] / f_rows[0]["ms"])
    masked = fid_bench.masked_moments_rows(64, 8, torch.device("cpu"), variants=(("torch", None),), reps=1)
    assert all("error" not in r for r in masked)
    assert "speedup" in dict(fid_bench.COLUMNS) and "error" in dict(ops_bench.COLUMNS)
