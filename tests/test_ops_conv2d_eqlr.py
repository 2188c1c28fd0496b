"""The fused equalized-lr convolution (xrayforge.ops.conv2d_eqlr) against the unfused reference
(F.interpolate / F.conv2d / avg_pool2d / leaky_relu / pixel norm): values and gradients, every
resample × activation, kernels 1 and 3, odd sizes, N = 1, channels 1 … 512, fp32 / bf16 / fp16 /
float64, contiguous, channels_last and strided inputs; gradcheck and gradgradcheck in float64;
bad inputs. In the Triton interpreter on the CPU, on the GPU where there is one."""
import importlib

import numpy as np
import pytest
import torch

from conftest import assert_as_accurate_as_eager, kernel_params
from xrayforge.errors import UserError
from xrayforge.ops import BackendUnavailableError, conv2d_eqlr
from xrayforge.ops.conv2d import no_weight_gradients

C = importlib.import_module("xrayforge.ops.conv2d_eqlr")
TRITON = [p for p in kernel_params() if p.values[0][0] == "triton"]
COMBOS = [(r, a) for r in (None, "up", "down") for a in ("linear", "lrelu", "lrelu_pn")]


def make(shape, layout="contiguous", dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        x = torch.randn((shape[0], shape[1] * 2) + tuple(shape[2:]), generator=g, dtype=torch.float64)[:, ::2]
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return (x * scale).to(device=device, dtype=dtype)


def layer(cin, cout, k, device="cpu", seed=1, requires_grad=False):
    w = make((cout, cin, k, k), seed=seed, device=device).requires_grad_(requires_grad)
    b = make((cout,), seed=seed + 1, device=device, scale=0.5).requires_grad_(requires_grad)
    return w, b, 2 ** 0.5 / (cin * k * k) ** 0.5


def test_reference_is_the_layer_definition():
    """The reference equals the strided (fused-resampling) form the layers use, in float64."""
    x = make((2, 3, 6, 5))
    w, b, scale = layer(3, 4, 3)
    for resample, act in COMBOS:
        ref = C.reference(x, w, b, scale=scale, activation=act, resample=resample)
        torch.testing.assert_close(C._differentiable(x, w, b, scale, act, resample), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("resample,activation", COMBOS)
@pytest.mark.parametrize("shape,cout,k", [((2, 5, 7, 6), 9, 3), ((1, 1, 5, 5), 3, 3), ((1, 17, 4, 3), 1, 3),
                                          ((2, 3, 5, 4), 20, 1)])
def test_float64_forward_equals_reference(kb, resample, activation, shape, cout, k):
    _, device = kb
    if resample is not None and k != 3:
        pytest.skip("resampling convolutions are 3x3")
    x = make(shape, device=device)
    w, b, scale = layer(shape[1], cout, k, device)
    got = conv2d_eqlr(x, w, b, scale=scale, activation=activation, resample=resample, backend="triton")
    ref = C.reference(x, w, b, scale=scale, activation=activation, resample=resample)
    assert got.shape == ref.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("resample,activation", [(None, "lrelu_pn"), ("up", "lrelu_pn"), ("down", "lrelu"),
                                                 (None, "linear")])
def test_low_precision_as_accurate_as_eager(kb, dtype, layout, resample, activation):
    _, device = kb
    x = make((2, 6, 5, 7), layout, device=device)
    w, b, scale = layer(6, 18, 3, device)
    exact = C.reference(x, w, b, scale=scale, activation=activation, resample=resample)
    xd = x.to(dtype)
    eager = C.reference(xd, w, b, scale=scale, activation=activation, resample=resample)
    got = conv2d_eqlr(xd, w, b, scale=scale, activation=activation, resample=resample, backend="triton")
    assert got.dtype == dtype and got.shape == exact.shape
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert_as_accurate_as_eager(got, eager, exact, dtype)


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("resample,activation,epilogue_backward", [
    (r, a, e) for r, a in COMBOS for e in ("torch", "triton") if a != "linear" or e == "torch"])
def test_float64_gradients_equal_reference(kb, resample, activation, epilogue_backward, monkeypatch):
    monkeypatch.setattr(C, "EPILOGUE_BACKWARD", epilogue_backward)
    _, device = kb
    x = make((2, 4, 5, 6), device=device).requires_grad_()
    w, b, scale = layer(4, 5, 3, device, requires_grad=True)
    gy = make(C.reference(x, w, b, scale=scale, activation=activation, resample=resample).shape, seed=7,
              device=device)
    got = torch.autograd.grad(conv2d_eqlr(x, w, b, scale=scale, activation=activation, resample=resample,
                                          backend="triton"), (x, w, b), gy)
    ref = torch.autograd.grad(C.reference(x, w, b, scale=scale, activation=activation, resample=resample),
                              (x, w, b), gy)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("activation", ["lrelu", "lrelu_pn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,shape", [("contiguous", (1, 5, 3, 7)), ("channels_last", (2, 18, 5, 3)),
                                          ("channels_last", (3, 1, 2, 2))])
def test_fused_epilogue_backward_equals_torch(kb, activation, dtype, layout, shape):
    """The one-pass Triton epilogue backward against the elementwise torch one: dz in the layer's
    dtype (rounded once from the same fp32 / float64 value) and the bias gradient."""
    _, device = kb
    x = make(shape, layout, device=device)
    w, b, scale = layer(shape[1], shape[1], 1, device)
    y, r = C._forward(x.to(dtype), w, b, scale, activation, None)
    gy = make(y.shape, seed=4, device=device).to(dtype)  # contiguous: like_layout matches y's strides
    want = C._epilogue_backward(gy, y, r, activation)
    dz, db = C._epilogue_backward_fused(gy, y, r, activation, True)
    assert dz.dtype == dtype and dz.stride() == y.stride()
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2 ** -8}[dtype]
    torch.testing.assert_close(dz.double(), want.to(dtype).double(), rtol=tol, atol=tol * want.abs().max().item())
    db_tol = 1e-12 if dtype == torch.float64 else 1e-5  # both sum the fp32 / float64 values
    torch.testing.assert_close(db.double(), want.double().sum(dim=(0, 2, 3)), rtol=db_tol,
                               atol=db_tol * want.abs().sum().item())
    _, none = C._epilogue_backward_fused(gy, y, r, activation, False)
    assert none is None


@pytest.mark.skipif(not TRITON or TRITON[0].values[0][1] != "cpu", reason="records the interpreter's memory accesses")
@pytest.mark.parametrize("activation", ["lrelu", "lrelu_pn"])
def test_fused_epilogue_backward_channel_offsets_past_int32(monkeypatch, activation):
    """Channel c of the layer's output sits c * OH * OW elements into its sample: that int32 product
    wrapped past 2^31 (pixel_norm's kernels had the same; see pixel_norm._channel_i64). Three channels
    2^30 apart, the kernel's loads and stores recorded, not performed."""
    from test_ops_pixel_norm import assert_accessed_exactly, recorded_accesses
    sc = 2**30
    y, gy, r = torch.zeros(1, 3, 1, 1), torch.zeros(1, 3, 1, 1), torch.zeros(1, 1, 1, 1)
    monkeypatch.setattr(C, "channel_view", lambda t: (1, 3, 1, 0, sc, 1))
    seen = recorded_accesses(monkeypatch)
    dz, _ = C._epilogue_backward_fused(gy, y, r if activation == "lrelu_pn" else None, activation, False)
    assert_accessed_exactly(seen, (y, gy, dz), (0, sc, 2 * sc), small=(r,))


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("resample,activation", [(None, "lrelu"), ("down", "lrelu"), ("up", "lrelu_pn"),
                                                 (None, "linear")])
def test_gradcheck_and_gradgradcheck(kb, resample, activation):
    """The discriminator's gradient penalty differentiates the input gradient again."""
    _, device = kb
    x = make((1, 2, 4, 4), device=device).requires_grad_()
    w, b, scale = layer(2, 3, 3, device, requires_grad=True)

    def f(x, w, b):
        return conv2d_eqlr(x, w, b, scale=scale, activation=activation, resample=resample, backend="triton")
    # cuDNN's float64 weight gradient may sum in a different order on each call (seen on an H200)
    tol = 1e-12 if device == "cuda" else 0.0
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True, nondet_tol=tol)
    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=True, nondet_tol=tol)


@pytest.mark.parametrize("kb", TRITON)
def test_gradient_penalty_equals_reference_and_skips_weight_gradients(kb):
    _, device = kb
    x = make((2, 3, 6, 6), device=device).requires_grad_()
    w, b, scale = layer(3, 4, 3, device, requires_grad=True)

    def penalty(fn, skip_weights):
        y = fn(x, w, b, scale=scale, activation="lrelu", resample="down")
        with no_weight_gradients(skip_weights):  # as the trainer takes the GP's input gradient
            gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w, b))

    ref = penalty(C.reference, False)
    for skip in (False, True):
        for g, r in zip(penalty(lambda *a, **k: conv2d_eqlr(*a, **k, backend="triton"), skip), ref):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    # under no_weight_gradients the first backward gives no weight or bias gradient at all
    y = conv2d_eqlr(x, w, b, scale=scale, activation="lrelu", resample="down", backend="triton")
    with no_weight_gradients():
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b), allow_unused=True)
    assert gw is None and gb is None
    torch.testing.assert_close(gx, torch.autograd.grad(C.reference(x, w, b, scale=scale, activation="lrelu",
                                                                   resample="down").sum(), x)[0])


@pytest.mark.parametrize("kb", TRITON)
def test_pixel_norm_over_512_channels_and_one_channel_out(kb):
    _, device = kb
    x = make((1, 3, 2, 3), device=device)
    w, b, scale = layer(3, 512, 1, device)
    got = conv2d_eqlr(x, w, b, scale=scale, activation="lrelu_pn", backend="triton")
    torch.testing.assert_close(got, C.reference(x, w, b, scale=scale, activation="lrelu_pn"), rtol=1e-12,
                               atol=1e-12)
    w1, b1, s1 = layer(3, 1, 1, device)  # toRGB
    torch.testing.assert_close(conv2d_eqlr(x, w1, b1, scale=s1, backend="triton"),
                               C.reference(x, w1, b1, scale=s1), rtol=1e-12, atol=1e-12)
    w2, _, s2 = layer(3, 513, 1, device)
    with pytest.raises(UserError, match="at most 512"):
        conv2d_eqlr(x, w2, None, scale=s2, activation="lrelu_pn", backend="triton")


def test_auto_passes_the_triton_kernel_by_for_a_pixel_norm_wider_than_its_tile(monkeypatch, caplog):
    # under auto (the benchmarks' auto_candidates, or once validated) Triton was chosen for a pixel-norm
    # layer of 513 output channels and refused it in the forward; now the unfused path runs, logged
    from xrayforge.ops import _backend
    real = _backend.resolve_for_device
    monkeypatch.setattr(_backend, "resolve_for_device", lambda op, device, *args: real(op, torch.device("cuda"), *args))
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, op, device: None if name != "cuda" else "no")
    monkeypatch.setattr(_backend, "_warned", set())
    x = make((1, 3, 2, 3))
    w, b, scale = layer(3, C.MAX_PN_CHANNELS + 1, 1)
    with _backend.auto_candidates(("triton",)), caplog.at_level("WARNING", logger="xrayforge.ops"):
        got = conv2d_eqlr(x, w, b, scale=scale, activation="lrelu_pn", backend="auto")
    torch.testing.assert_close(got, C.reference(x, w, b, scale=scale, activation="lrelu_pn"))
    assert "fell back to 'torch'" in caplog.text and "at most 512 output channels, got 513" in caplog.text
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot take this input: .*at most 512"):
        conv2d_eqlr(x, w, b, scale=scale, activation="lrelu_pn", backend="triton")


@pytest.mark.parametrize("kb", TRITON)
def test_fused_epilogue_backward_past_its_limits_takes_the_torch_one(kb, monkeypatch):
    # EPILOGUE_BACKWARD = "triton" ran pixel_norm's Triton blocks, which refuse more channels than
    # MAX_TRITON_CHANNELS (here made 4) and batches past the launch grid: the backward failed
    _, device = kb
    pn = importlib.import_module("xrayforge.ops.pixel_norm")
    monkeypatch.setattr(C, "EPILOGUE_BACKWARD", "triton")
    monkeypatch.setattr(pn, "MAX_TRITON_CHANNELS", 4)
    x = make((1, 3, 2, 3), device=device).requires_grad_()
    w, b, scale = layer(3, 5, 1, device, requires_grad=True)
    got = torch.autograd.grad(conv2d_eqlr(x, w, b, scale=scale, activation="lrelu", backend="triton").sum(), (x, w, b))
    ref = torch.autograd.grad(C.reference(x, w, b, scale=scale, activation="lrelu").sum(), (x, w, b))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_taps_of_each_resample_are_the_strided_forms():
    w = make((4, 3, 3, 3))
    x = make((2, 3, 5, 4), seed=3)
    # up: each output parity class is a 2x2-tap convolution of the half-resolution input
    up = C.reference(x, w, scale=1.0, resample="up")
    t = C.taps(w, "up")
    assert t.shape == (4, 4, 3, 4)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for cls in range(4):
        py, px = divmod(cls, 2)
        kern = t[cls].reshape(2, 2, 3, 4).permute(3, 2, 0, 1)  # (out, in, a, b)
        part = torch.nn.functional.conv2d(xp[:, :, py:py + 6, px:px + 5], kern)
        torch.testing.assert_close(part, up[:, :, py::2, px::2], rtol=1e-12, atol=1e-12)
    assert C.taps(w, "down").shape == (1, 16, 3, 4) and C.taps(w, None).shape == (1, 9, 3, 4)


@pytest.mark.parametrize("kb", TRITON)
def test_equalized_conv2d_layer_uses_it_when_asked(kb):
    from xrayforge.nn.layers import EqualizedConv2d
    _, device = kb
    torch.manual_seed(0)
    for resample, act in (("up", "lrelu_pn"), ("down", "lrelu"), (None, "linear")):
        layer_ = EqualizedConv2d(5, 6, 3, activation=act, resample=resample).double().to(device)
        with torch.no_grad():
            layer_.bias.normal_()
        x = make((1, 5, 4, 4), device=device, seed=5)
        ref = layer_(x)
        layer_.eqlr_backend = "triton"
        torch.testing.assert_close(layer_(x), ref, rtol=1e-12, atol=1e-12)
    assert C.layer_backend(5, 6, 3, "up", "lrelu_pn", 8, torch.bfloat16) is None  # not a measured shape


def test_layer_table_holds_only_shapes_of_the_networks():
    """Every entry of the measured table is a layer of the 1024-px G or D, keyed by its output size
    and a low-precision dtype, as EqualizedConv2d looks it up."""
    from xrayforge.bench.ops import conv_layer_shapes
    out = {"up": lambda n: 2 * n, "down": lambda n: n // 2, None: lambda n: n}
    shapes = {(s["cin"], s["cout"], s["kernel"], s["resample"], s["activation"], out[s["resample"]](s["size"]))
              for s in conv_layer_shapes()}
    for key, backend in C.LAYER_TABLE.items():
        assert key[:6] in shapes and key[6] in ("bfloat16", "float16") and backend == "triton", key
    for key in C.LAYER_TABLE:
        assert C.layer_backend(*key[:6], getattr(torch, key[6])) == "triton"


def test_autotune_candidates_are_launchable_hopper_tiles():
    """The declared configurations for every layer of the 1024-px networks: the fixed choice
    first, at most MAX_CANDIDATES distinct ones, power-of-two tiles, pixel norm's tile over all
    output channels, the accumulator and shared memory within bounds; one configuration for the
    FMA dtypes and the interpreter. (benchmarks/triton_aot_check.py compiles each for sm_90.)"""
    from xrayforge.bench.ops import conv_layer_shapes
    for s in conv_layer_shapes():
        pn = s["activation"] == "lrelu_pn"
        cands = C.candidates(s["cin"], s["cout"], pn)
        assert cands[0] == C._blocks(s["cin"], s["cout"], pn, False), s
        assert 2 <= len(cands) <= C.MAX_CANDIDATES and len(set(cands)) == len(cands), s
        for bm, bn, bk, warps, stages in cands:
            assert all(v >= 16 and v & (v - 1) == 0 for v in (bm, bn, bk)), (s, bm, bn, bk)
            assert warps in (4, 8) and stages >= 2
            assert bm * bn <= 2048 * warps and stages * (bm * bk + bk * bn) * 2 <= C.SMEM_BUDGET
            assert bn >= s["cout"] if pn else bn <= 128
        for fma, interp in ((True, False), (False, True)):
            assert C.candidates(s["cin"], s["cout"], pn, interp, fma) == [C._blocks(s["cin"], s["cout"], pn, interp,
                                                                                    fma)]


def test_autotune_keeps_the_fastest_and_skips_failures(monkeypatch):
    monkeypatch.setattr(C, "_TUNED", {})
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    ran = []

    def launch(cfg):
        ran.append(cfg)
        if cfg == "d":
            raise C._config_errors()[0]("out of resources")
        if cfg == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory")

    def timer(fn):
        fn()
        return times[ran[-1]]
    assert C._autotune("k", ["a", "d", "b", "c"], launch, timer) == "b"
    assert ran == ["a", "d", "b", "c"] and C.tuned_blocks() == {"k": "b"}
    assert C._autotune("k", ["a", "c"], launch, timer) == "b" and len(ran) == 4  # cached: nothing timed
    assert C._autotune("one", ["a"], launch, lambda fn: 1 / 0) == "a"  # a single configuration is not timed
    with pytest.raises(C._config_errors()[0], match="out of resources"):
        C._autotune("bad", ["d", "d"], launch, timer)
    with pytest.raises(torch.OutOfMemoryError):  # not a property of the configuration: not skipped
        C._autotune("oom", ["oom", "a"], launch, timer)
    assert "bad" not in C.tuned_blocks() and "oom" not in C.tuned_blocks()


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("cin,cout,resample,activation", [(16, 16, None, "lrelu_pn"), (32, 16, "up", "lrelu_pn"),
                                                          (16, 32, "down", "lrelu"), (1, 16, None, "lrelu"),
                                                          (64, 128, None, "lrelu")])
def test_every_autotune_candidate_computes_the_layer(kb, cin, cout, resample, activation):
    """Each Hopper tile configuration the autotuner may pick, in bf16 channels_last (run by the
    interpreter on the CPU): as accurate as eager against float64."""
    _, device = kb
    k = 1 if cin == 1 else 3
    x = make((2, cin, 12, 13), "channels_last", device=device)  # 312 pixels: several pixel tiles for every BM
    w, b, scale = layer(cin, cout, k, device)
    exact = C.reference(x, w, b, scale=scale, activation=activation, resample=resample)
    xb = x.to(torch.bfloat16)
    eager = C.reference(xb, w, b, scale=scale, activation=activation, resample=resample)
    for cfg in C.candidates(cin, cout, activation == "lrelu_pn"):
        got, _ = C._forward(xb, w, b, scale, activation, resample, blocks=cfg)
        assert_as_accurate_as_eager(got, eager, exact, torch.bfloat16)


@pytest.mark.parametrize("kb", TRITON)
def test_autotune_switch_runs_the_layer_and_records_its_choice(kb, monkeypatch):
    _, device = kb
    monkeypatch.setattr(C, "AUTOTUNE", True)
    monkeypatch.setattr(C, "_TUNED", {})
    x = make((2, 16, 6, 6), "channels_last", device=device).to(torch.bfloat16)
    w, b, scale = layer(16, 32, 3, device)
    exact = C.reference(x.double(), w, b, scale=scale, activation="lrelu", resample="down")
    eager = C.reference(x, w, b, scale=scale, activation="lrelu", resample="down")
    got = conv2d_eqlr(x, w, b, scale=scale, activation="lrelu", resample="down", backend="triton")
    assert_as_accurate_as_eager(got, eager, exact, torch.bfloat16)
    (key, cfg), = C.tuned_blocks().items()
    assert key == (2, 16, 6, 6, 32, 3, "down", "lrelu", "bfloat16", True, str(x.device))
    interp = device == "cpu"
    assert cfg in C.candidates(16, 32, False, interp) and (not interp or cfg == C._blocks(16, 32, False, True))


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.zeros(2, 3, 4), torch.zeros(4, 3, 3, 3)), {}, r"\(N, C, H, W\)"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3)), {}, "odd k"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 2, 2)), {}, "odd k"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 5, 5)), {"resample": "up"}, "resampling convolutions are 3×3"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 2, 3, 3)), {}, "takes 2 input channels, the input has 3"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3), torch.zeros(3)), {}, r"bias of shape \(4,\)"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3), [0.0] * 4), {}, r"bias of shape \(4,\), got list"),
    # the Triton kernel took a weight or bias on another device by its raw pointer
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3, device="meta")), {}, "the weight is on meta"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3), torch.zeros(4, device="meta")), {}, "the bias is on meta"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3)), {"activation": "relu"}, "activation must be"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3)), {"resample": "up4"}, "resample must be"),
    ((torch.zeros(1, 3, 1, 4), torch.zeros(4, 3, 3, 3)), {"resample": "down"}, "cannot downsample"),
    ((torch.zeros(1, 3, 4, 4, dtype=torch.int64), torch.zeros(4, 3, 3, 3)), {}, "floating-point"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3)), {"scale": float("nan")}, "finite"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3)), {"scale": torch.tensor(0.5)}, "a Python or NumPy number"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3)), {"scale": True}, "a Python or NumPy number"),
])
def test_bad_inputs(args, kwargs, match):
    kwargs = {"scale": 1.0, **kwargs}
    with pytest.raises(UserError, match=match):
        conv2d_eqlr(*args, **kwargs)
    for kb in TRITON:  # refused before the kernel reads anything
        with pytest.raises(UserError, match=match):
            conv2d_eqlr(*args, **kwargs, backend=kb.values[0][0])


def test_auto_on_cpu_is_the_reference():
    x = make((1, 2, 3, 3))
    w, b, scale = layer(2, 3, 3)
    torch.testing.assert_close(conv2d_eqlr(x, w, b, scale=scale, activation="lrelu"),
                               C.reference(x, w, b, scale=scale, activation="lrelu"), rtol=0, atol=0)


def _bf16_layer_check(device, cin, cout, size, resample, activation, batch=4):
    """Values and first-order gradients in bf16 channels_last as accurate as eager's against the
    float64 gradient. Gradients are compared in relative L2 norm: where a pre-activation is
    within rounding of 0 the leaky ReLU's slope (1 or 0.2) may differ between any two bf16
    computations, so the largest single difference says nothing (eager's own largest error
    against float64 is 30% of the largest gradient there)."""
    k = 1 if cin == 1 or cout == 1 else 3
    x = make((batch, cin, size, size), "channels_last", device=device)
    w, b, scale = layer(cin, cout, k, device, requires_grad=True)
    kwargs = dict(scale=scale, activation=activation, resample=resample)
    xd = x.clone().requires_grad_()
    exact = C.reference(xd, w, b, **kwargs)
    xb = x.to(torch.bfloat16).requires_grad_()
    eager = C.reference(xb, w, b, **kwargs)
    got = conv2d_eqlr(xb, w, b, **kwargs, backend="triton")
    assert_as_accurate_as_eager(got.detach(), eager.detach(), exact.detach(), torch.bfloat16)
    gy = make(exact.shape, seed=9, device=device)
    g_exact = torch.autograd.grad(exact, (xd, w, b), gy)
    g_eager = torch.autograd.grad(eager, (xb, w, b), gy.to(eager.dtype))
    g_ours = torch.autograd.grad(got, (xb, w, b), gy.to(got.dtype))
    for name, o, e, ref in zip(("input", "weight", "bias"), g_ours, g_eager, g_exact):
        err = lambda g: ((g.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(o) <= 1.5 * err(e) + 2e-3, f"{name} gradient: relative error {err(o):.3g} vs eager {err(e):.3g}"


@pytest.mark.parametrize("kb", [p for p in TRITON if p.values[0][1] == "cpu"])
@pytest.mark.parametrize("cin,cout,size,resample,activation", [(1, 16, 8, None, "lrelu"), (8, 16, 8, "up", "lrelu_pn"),
                                                               (8, 16, 8, "down", "lrelu")])
@pytest.mark.parametrize("epilogue_backward", ["torch", "triton"])
def test_bf16_values_and_gradients_as_accurate_as_eager(kb, cin, cout, size, resample, activation, epilogue_backward,
                                                        monkeypatch):
    monkeypatch.setattr(C, "EPILOGUE_BACKWARD", epilogue_backward)
    _bf16_layer_check(kb[1], cin, cout, size, resample, activation, batch=2)


@pytest.mark.gpu
@pytest.mark.parametrize("kb", [p for p in TRITON if p.values[0][1] == "cuda"])
@pytest.mark.parametrize("cin,cout,size,resample,activation", [
    (512, 512, 8, "up", "lrelu_pn"), (256, 128, 64, "up", "lrelu_pn"), (16, 16, 256, None, "lrelu_pn"),
    (16, 1, 256, None, "linear"), (1, 16, 256, None, "lrelu"), (32, 64, 128, "down", "lrelu"),
    (512, 512, 4, None, "lrelu")])
@pytest.mark.parametrize("epilogue_backward", ["torch", "triton"])
def test_pggan_layer_shapes_on_gpu(kb, cin, cout, size, resample, activation, epilogue_backward, monkeypatch):
    """The 1024-px networks' layer shapes in bf16 channels_last."""
    monkeypatch.setattr(C, "EPILOGUE_BACKWARD", epilogue_backward)
    _bf16_layer_check(kb[1], cin, cout, size, resample, activation)


def test_a_numpy_scale_is_a_number():
    x = make((1, 2, 3, 3))
    w, b, scale = layer(2, 3, 3)
    torch.testing.assert_close(conv2d_eqlr(x, w, b, scale=np.float32(scale), activation="lrelu"),
                               C.reference(x, w, b, scale=float(np.float32(scale)), activation="lrelu"))


@pytest.mark.parametrize("args,kwargs,match", [
    # the reference failed inside F.conv2d or the bias add, the Triton path in a reshape ("-1 ... is
    # ambiguous"), and for images without pixels the Triton path returned what the reference refused
    ((torch.zeros(1, 0, 4, 4), torch.zeros(4, 0, 3, 3), torch.zeros(4)), {}, "no input channels"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(0, 3, 3, 3), torch.zeros(0)), {}, "no output channels"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(0, 3, 3, 3)), {"activation": "lrelu_pn"}, "no output channels"),
    ((torch.zeros(1, 3, 0, 4), torch.zeros(4, 3, 3, 3)), {}, "0×4: no pixels"),
    ((torch.zeros(1, 3, 2, 0), torch.zeros(4, 3, 3, 3)), {"resample": "up"}, "2×0: no pixels"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3), torch.zeros(4, dtype=torch.complex64)), {},
     "floating-point bias, got torch.complex64"),  # a KeyError inside Triton; the reference dropped the imaginary part
    ((torch.zeros(1, 3, 4, 4), torch.zeros(4, 3, 3, 3), torch.zeros(4, dtype=torch.int64)), {}, "floating-point bias"),
])
def test_empty_layers_and_non_float_biases_are_refused(args, kwargs, match):
    kwargs = {"scale": 1.0, **kwargs}
    with pytest.raises(UserError, match=match):
        conv2d_eqlr(*args, **kwargs)
    for kb in TRITON:
        with pytest.raises(UserError, match=match):
            conv2d_eqlr(*args, **kwargs, backend=kb.values[0][0])


@pytest.mark.parametrize("resample", [None, "up", "down"])
def test_an_empty_batch_gives_an_empty_result_on_every_backend(resample):
    x, w, b = torch.zeros(0, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(3)
    want = conv2d_eqlr(x, w, b, scale=1.0, activation="lrelu_pn", resample=resample)
    for kb in TRITON:
        got = conv2d_eqlr(x, w, b, scale=1.0, activation="lrelu_pn", resample=resample, backend=kb.values[0][0])
        assert got.shape == want.shape
