"""The GPU window's script: its junit parsing, its stage plumbing, and a whole dry run on the
CPU (so that a typo cannot waste a GPU window)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xrayforge.bench import gpu_check
from xrayforge.bench.ops import CONV_PASSES, CONV_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="9">
 <testcase classname="tests.test_ops_pixel_norm" name="test_kernel_matches_reference[triton-cuda-float32-(1, 7)]" file="tests/test_ops_pixel_norm.py"/>
 <testcase classname="tests.test_ops_pixel_norm" name="test_kernel_matches_reference[cuda-cuda-float32-(1, 7)]" file="tests/test_ops_pixel_norm.py"/>
 <testcase classname="tests.test_ops_pixel_norm" name="test_full_size_on_gpu[torch.float32-(8, 16, 1024, 1024)-cuda]" file="tests/test_ops_pixel_norm.py">
  <failure message="AssertionError: error 1e-3 vs eager 1e-7">trace</failure></testcase>
 <testcase classname="tests.test_ops_minibatch_stddev" name="test_full_size_on_gpu[torch.bfloat16-triton]"/>
 <testcase classname="tests.test_ops_minibatch_stddev" name="test_full_size_on_gpu[torch.bfloat16-cuda]">
  <skipped message="CUDA extension not built"/></testcase>
 <testcase classname="tests.test_ops_bias_lrelu" name="test_kernel_matches_reference[triton-cuda-(1, 1)-contiguous-torch.float32]" file="tests/test_ops_bias_lrelu.py"/>
 <testcase classname="tests.test_fid" name="test_preprocessing_kernel_matches_reference[1-case0-triton-cuda]" file="tests/test_fid.py"/>
 <testcase classname="tests.test_fid" name="test_frechet_matches_scipy" file="tests/test_fid.py"/>
 <testcase classname="tests.test_ops_pixel_norm" name="test_reference_only" file="tests/test_ops_pixel_norm.py"/>
</testsuite></testsuites>
"""


def test_junit_maps_tests_to_ops_and_backends(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(JUNIT)
    res = gpu_check.parse_junit(path)
    assert res["totals"] == {"passed": 7, "failed": 1, "skipped": 1}
    # one failure (the full-size cuda test) keeps pixel_norm and bias_lrelu_pixel_norm out for cuda
    assert res["per_pair"]["pixel_norm/cuda"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert res["validated"] == ["bias_lrelu/triton", "bias_lrelu_pixel_norm/triton", "fid_preprocess/triton",
                                "minibatch_stddev/triton", "pixel_norm/triton"]
    assert "minibatch_stddev/cuda" in res["per_pair"] and "minibatch_stddev/cuda" not in res["validated"]
    assert res["failed_tests"] == ["tests.test_ops_pixel_norm::test_full_size_on_gpu[torch.float32-(8, 16, 1024, 1024)-cuda]"]


def test_backend_is_read_from_the_parameter_id():
    assert gpu_check._backend_of("t[triton-cuda-x]") == "triton"
    assert gpu_check._backend_of("t[cuda-cuda-x]") == "cuda"
    assert gpu_check._backend_of("t[triton-cpu]") == "triton"
    assert gpu_check._backend_of("t[torch.float32-(8, 16)-cuda]") == "cuda"
    assert gpu_check._backend_of("t[torch]") is None
    assert gpu_check._backend_of("test_plain") is None


def test_ops_summary_orders_backends_by_median_speedup():
    rows = [{"op": "pixel_norm", "backend": "torch", "fwd+bwd_speedup": 1.0},
            {"op": "pixel_norm", "backend": "triton", "fwd+bwd_speedup": 2.0},
            {"op": "pixel_norm", "backend": "triton", "fwd+bwd_speedup": 4.0},
            {"op": "pixel_norm", "backend": "cuda", "fwd+bwd_speedup": 3.5},
            {"op": "pixel_norm", "backend": "cuda", "fwd+bwd_speedup": float("nan")}]
    s = gpu_check.ops_summary(rows)["pixel_norm"]
    assert s["median_speedup"] == {"triton": 3.0, "cuda": 3.5}
    assert s["fastest_first"] == ["cuda", "triton"]


def test_a_stage_past_its_cap_is_killed_and_recorded(tmp_path):
    # the FID stage cannot finish in 3 s on a CPU: it must come back as timed out, not hang
    lines = []
    res = gpu_check._run_stage("fid", True, tmp_path, tmp_path, 3, lines.append)
    assert res["status"] == "timed out" and res["seconds"] < 30
    assert "partial results kept" in res["error"]


def test_unknown_stage_and_argument_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--only", "ops,warp"])
    rc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert rc.returncode == 2 and "unknown argument" in rc.stderr


def test_script_is_valid_bash_and_explains_itself():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--dry-run" in out and "--only" in out and "gpu_check.json" in out


def test_an_earlier_report_is_never_replaced(tmp_path, capsys):
    # a second run (an --only rerun, a merge) into the same folder replaced the earlier run's report
    (tmp_path / "gpu_check.json").write_text('{"earlier": 1}')
    (tmp_path / "gpu_check.log").write_text("earlier log\n")
    for argv in (["--out", str(tmp_path), "--only", "env", "--dry-run"], ["--merge", str(tmp_path / "gpu_check.json"),
                                                                        "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.main(argv)
        assert exc.value.code == 2 and "already holds a gpu_check.json" in capsys.readouterr().err
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2 and "already holds a gpu_check.json" in proc.stderr
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == {"earlier": 1}
    assert (tmp_path / "gpu_check.log").read_text() == "earlier log\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log"]


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """The whole script at tiny sizes: every stage passes, at most five files come back (the
    device returns at most eight), and the report has every section."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, XRAYFORGE_WHEELS=str(tmp_path / "no-wheels"))
    # a budget past the stages' caps: on a loaded machine (pytest -n 2 on 2 cores) the default 280 s left
    # the fid stage 71 s, and it was cut there; what is checked here is that every stage works
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--budget", "900", "--deadline",
                           "1100"], capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log", "gpu_tests.xml"} <= set(files) <= set(gpu_check.OUT_FILES)
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2 ** 20 for p in out.iterdir())
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert {n: s["status"] for n, s in report["stages"].items()} == {n: "passed" for n in gpu_check.STAGES}
    st = report["stages"]
    assert st["env"]["data"]["copy_gbps"] > 0
    assert st["tests"]["data"]["validated"]  # a few interpreter tests ran and were mapped
    ops_rows = st["ops"]["data"]["rows"]
    assert {r["backend"] for r in ops_rows} == {"torch", "triton"}
    assert not [r for r in ops_rows if any("error" in k for k in r)]
    assert {r["op"] for r in ops_rows} == {"pixel_norm", "bias_lrelu_pixel_norm", "bias_lrelu", "minibatch_stddev"}
    # every fast path's forward and gradients checked against float64 beside its timings
    assert all(r["matches_reference"] is True for r in ops_rows if r["backend"] != "torch")
    assert all(r["max_grad_err"] >= 0 for r in ops_rows)
    conv = st["conv"]["data"]
    # every layer's variants, the autotuned ones (their compiles: what a cap should cut) after all the others
    assert [(r["layer"], r["variant"]) for r in conv["rows"]] == [
        (i, v[0]) for variants in CONV_PASSES for i in range(len(conv["layers"])) for v in variants]
    assert conv["device"]["name"] and all("fwd_peak_frac" in r and "fwd_hbm_frac" in r for r in conv["rows"])
    assert {s["resample"] for s in conv["layers"]} == {None, "up", "down"}
    assert not [r for r in conv["rows"] if "error" in r] and all(r["fwd+bwd_ms"] > 0 for r in conv["rows"])
    assert all(r["max_err"] < 1e-4 for r in conv["rows"]) and isinstance(conv["layer_table"], list)
    assert all(r["max_grad_err"] < 1e-4 for r in conv["rows"])
    assert all(r["matches_reference"] is True for r in conv["rows"] if r["variant"] != CONV_VARIANTS[0][0])
    tuned = [r["tuned_blocks"] for r in conv["rows"] if r["variant"] == CONV_VARIANTS[3][0]]
    assert len(tuned) == len(conv["layers"]) and all(len(t) == 1 and len(t[0]) == 5 for t in tuned)
    assert isinstance(conv["layer_table_autotuned"], list)
    train = st["train"]["data"]
    assert [r["mode"] for r in train["rows"]] == ["baseline", "torch-fused", "torch-gradfix", "triton"]
    assert all("img_s" in r and r["phases_ms"] for r in train["rows"])
    assert any("cuda" in s for s in train["skipped"])
    loop = train["trainer_loop"]  # the trainer's whole loop beside its bare step, on the same networks
    assert loop["loop_img_s"] > 0 and loop["step_img_s"] > 0 and len(loop["loop_img_s_ticks"]) == 2
    assert "Trainer loop" in (out / "gpu_check.md").read_text()
    fid = st["fid"]["data"]
    assert {r["stage"] for r in fid["rows"]} >= {"preprocess", "inception"}
    assert not [r for r in fid["rows"] if "error" in r]
    assert fid["fast_mode_accuracy"]["images"] > 0
    masked = fid["masked_moments"]
    assert [(r["stage"].split("K=")[1], r["variant"]) for r in masked] == [
        (k, v) for k in ("1", "15") for v in ("torch float64 loop", "triton ieee", "triton tf32x3")]
    assert not [r for r in masked if "error" in r] and all(r["ms"] > 0 for r in masked)
    assert all(r["max_rel_err_m2"] < 1e-6 for r in masked if r["variant"] != "torch float64 loop")
    assert masked[4]["k15_over_k1"] > 0
    assert st["sampling"]["data"]["lco"]["steps_s"] > 0
    knn = st["knn"]["data"]["rows"]
    assert [r["variant"] for r in knn] == ["ops.knn backend torch", "ops.knn backend triton (ieee)",
                                           "ops.knn backend triton (tf32x3)", "knn triton"]
    assert not [r for r in knn if "error" in r] and knn[1]["same_neighbours"] == knn[2]["same_neighbours"] == 1.0
    md = (out / "gpu_check.md").read_text()
    for section in ("DRY RUN", "## Stages", "## Kernel validation", "## Ops", "## Fused equalized-lr convolutions", "## Training step",
                    "## FID pipeline", "## Masked feature moments", "## k nearest neighbours", "## Sampling", "Skipped parts"):
        assert section in md


def _report(started, commit, stages):
    env = {"status": "passed", "data": {"environment": {"commit": commit}}}
    return {"started": started, "dry_run": False,
            "stages": {"env": env, **{n: {"status": st, "data": {"x": started}} for n, st in stages.items()}}}


def test_merge_takes_each_stage_from_the_last_run_that_ran_it(tmp_path):
    a = _report("t1", "aaa", {"tests": "failed", "ops": "passed", "train": "passed"})
    b = _report("t2", "bbb", {"tests": "passed", "ops": "skipped", "train": "timed out"})
    merged = gpu_check.merge_reports([a, b])
    st = merged["stages"]
    assert (st["tests"]["status"], st["tests"]["commit"]) == ("passed", "bbb")
    assert (st["ops"]["status"], st["ops"]["commit"], st["ops"]["data"]["x"]) == ("passed", "aaa", "t1")
    assert st["train"]["status"] == "timed out"  # a later run that ran it wins, even when it failed
    assert [m["commit"] for m in merged["merged_from"]] == ["aaa", "bbb"]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert gpu_check.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out",
                           str(tmp_path / "m")]) == 0
    assert "Merged from runs" in (tmp_path / "m" / "gpu_check.md").read_text()
    (tmp_path / "bad.json").write_text("{}")
    for bad in (tmp_path / "missing.json", tmp_path / "bad.json"):
        with pytest.raises(SystemExit):
            gpu_check.main(["--merge", str(bad), "--out", str(tmp_path / "m2")])


@pytest.mark.slow
@pytest.mark.parametrize("variants", ["x=(64, 512, 4, 4) nchw float32",
                                      "knn 7x9x3 float32 ieee k=5"])  # its host code reads the features' range
def test_triton_kernels_compile_for_hopper_without_a_gpu(variants):
    """benchmarks/triton_aot_check.py on a few variants: the real compiler, down to an sm_90 cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_aot_check.py"), "-j", "2",
                           "-k", variants], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = [ln for ln in proc.stdout.splitlines() if "compiled to cubin" in ln][0]
    assert " 0 FAIL" in summary and not summary.split("sm_90: ")[1].startswith("0 OK")
    assert "; 0 host errors;" in summary, summary


def test_conv_layer_table_counts_the_gradient_penalty_for_discriminator_layers():
    from xrayforge.bench.ops import conv_layer_shapes, layer_table
    layers = conv_layer_shapes(1024, 512)
    assert len(layers) == 36 and {s["resample"] for s in layers} == {None, "up", "down"}
    g = next(s for s in layers if s["activation"] == "lrelu_pn" and s["resample"] == "up" and s["size"] == 64)
    d = next(s for s in layers if s["activation"] == "lrelu" and s["resample"] == "down" and s["size"] == 128)
    # per layer: cuDNN, fused with the torch epilogue backward, with the Triton one, with autotuned tiles
    rows = [{"fwd+bwd_ms": 2.0}, {"fwd+bwd_ms": 1.0}, {"fwd+bwd_ms": 3.0}, {"fwd+bwd_ms": 2.5},  # G: fused wins f+b
            {"fwd+bwd_ms": 2.0, "gp_ms": 3.0}, {"fwd+bwd_ms": 1.5, "gp_ms": 4.0},  # D layer: GP loses it...
            {"fwd+bwd_ms": 1.0, "gp_ms": 3.0},                                     # ...with the torch backward
            {"fwd+bwd_ms": 1.9, "gp_ms": 2.9}]
    for k, r in enumerate(rows):
        r.update(layer=k // 4, variant=CONV_VARIANTS[k % 4][0])
    # as conv_rows writes them: every layer's first three variants, then the autotuned ones
    rows = [r for r in rows if not r["variant"].endswith("autotuned tiles")] + [rows[3], rows[7]]
    assert layer_table(rows, [g, d]) == {(256, 128, 3, "up", "lrelu_pn", 128, "bfloat16"): "triton"}
    assert layer_table(rows, [g, d], fused=2) == {(128, 256, 3, "down", "lrelu", 64, "bfloat16"): "triton"}
    assert layer_table(rows, [g, d], fused=3) == {(128, 256, 3, "down", "lrelu", 64, "bfloat16"): "triton"}
    rows[4]["gp_ms"] = 3.2  # now 4.7 ms against 5.0: the D layer joins (output size 64: pooled)
    assert (128, 256, 3, "down", "lrelu", 64, "bfloat16") in layer_table(rows, [g, d])
    assert layer_table(rows[:4], [g, d]) == {(256, 128, 3, "up", "lrelu_pn", 128, "bfloat16"): "triton"}  # cut short
    assert layer_table(rows[:7], [g, d], fused=3) == {}  # cut before D's autotuned row
    rows[1]["error"] = "x"
    assert (256, 128, 3, "up", "lrelu_pn", 128, "bfloat16") not in layer_table(rows, [g, d])


# ---------------------------------------------------------------- bench plumbing (benchmarks/*.py)
def test_bench_results_never_replace_earlier_ones(tmp_path):
    from xrayforge.bench import write_results
    payload = {"device": {"name": "NVIDIA H200"}, "rows": [1]}
    first = write_results("ops", payload, tmp_path)
    second = write_results("ops", dict(payload, rows=[2]), tmp_path)
    third = write_results("ops", dict(payload, rows=[3]), tmp_path)
    assert len({first, second, third}) == 3 and second.name == first.stem + "-2.json"
    assert [json.loads(p.read_text())["rows"] for p in (first, second, third)] == [[1], [2], [3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (first, second, third))


def test_bench_suite_json_is_written_atomically(tmp_path):
    from xrayforge.bench import suite

    class Unprintable:
        def __str__(self):
            raise RuntimeError("half way")
    path = tmp_path / "b.json"
    path.write_text('{"earlier": 1}')
    with pytest.raises(RuntimeError, match="half way"):  # a failure while serialising leaves the file as it was
        suite.save_json({"ops": ({"rows": [1.0], "oops": Unprintable()}, [])}, str(path))
    assert json.loads(path.read_text()) == {"earlier": 1}
    suite.save_json({"ops": ({"rows": [1.0], "oops": object()}, [])}, str(path))
    assert json.loads(path.read_text())["ops"]["rows"] == [1.0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("script", ["ops", "fid", "lco", "train_step"])
def test_bench_scripts_refuse_cuda_without_a_gpu(script, capsys):
    import importlib
    main = importlib.import_module(f"xrayforge.bench.{script}").main
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


@pytest.mark.parametrize("cin,cout,kernel,resample,activation,size", [
    (16, 8, 3, None, "lrelu_pn", 8), (16, 8, 3, "up", "lrelu_pn", 4), (8, 16, 3, "down", "lrelu", 8),
    (16, 1, 1, None, "linear", 8)])
def test_train_step_flops_count_the_fused_conv_kernel(cin, cout, kernel, resample, activation, size):
    # a Triton launch is no aten op: the dispatch-mode counter missed the forward of every layer the
    # per-layer table sends to ops.conv2d_eqlr, so the triton / cuda modes' TFLOP/s and MFU came out low
    import torch
    from xrayforge.bench.train_step import _count_fused_convs, _FlopCounter
    from xrayforge.nn import EqualizedConv2d
    layer = EqualizedConv2d(cin, cout, kernel, activation=activation, resample=resample, fused=True)
    x = torch.randn(2, cin, size, size)
    counts = {}
    for backend in ("cudnn", "triton"):  # cuDNN's path in the strided form, the same taps as the kernel's
        layer.eqlr_backend = backend
        counter = _FlopCounter()
        with torch.no_grad(), counter, _count_fused_convs(counter):
            layer(x)
        counts[backend] = counter.total
    assert counts["triton"] == counts["cudnn"] > 0


def test_a_run_without_the_env_stage_says_which_device_and_commit(tmp_path):
    # the GPU window runs `--only tests,conv` and `--only train,fid`: without the env stage the report
    # named no device ("GPU check — ?"), no versions and no commit, so an H100's figures read as anyone's
    assert gpu_check.main(["--out", str(tmp_path), "--only", "ops", "--dry-run"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["stages"]["env"]["status"] == "skipped" and report["commit"]
    data = report["stages"]["ops"]["data"]
    assert data["device"]["name"] and data["versions"]["torch"]
    head = (tmp_path / "gpu_check.md").read_text().splitlines()[:3]
    assert head[0] == f"# GPU check — {data['device']['name']} (DRY RUN on the CPU: no GPU figure)"
    assert f"commit {report['commit']}" in head[2] and "torch None" not in head[2]
    assert gpu_check.merge_reports([report])["merged_from"][0]["commit"] == report["commit"]
