"""Weight / activation formats (cpp/cpu/quant.cpp) against gguf-py, the reference implementation.

- dequantize: bit-identical to gguf.quants.dequantize on random valid blocks.
- quantize: bit-identical to gguf.quants.quantize where gguf-py implements the type.
- vec_dot: close to a float64 numpy dot of the dequantized weight row and the dequantized
  activation row that the kernel really sees (x quantized to dot_type(w)); tolerances below.
- unknown / unsupported type ids raise x2l_edge.FormatError.
SIMD and scalar kernels are both checked (set_force_scalar). The kernels are called through the test
module x2l_edge._testing, whose copy of them set_force_scalar switches; _core's user-facing quantize and
dequantize run the same code (test_core_formats_are_the_kernels).
"""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

import probes  # noqa: E402
import x2l_edge  # noqa: E402
from x2l_edge import _core  # noqa: E402

K = probes.require()  # quantize, dequantize, vec_dot, set_force_scalar

# Relative tolerance of vec_dot against the float64 reference, as a fraction of sum|w_i * x_i|.
# The kernels sum exact integer products per block and accumulate one float32 term per block,
# so the error is a few float32 ulps of the magnitude; 2e-5 leaves room for ~100 blocks.
RTOL_DOT = 2e-5
# Q4_1 / Q5_1 use Q8_1's fp16 s = fp16(d * sum(q)) for the m * sum(x) term (as ggml does), which
# is rounded to 11 bits: against the plain dequantized reference each block may add up to
# 2^-11 * |m * s|.
FP16_EPS = 2.0**-11

DEQUANT_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K]
QUANT_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # gguf-py quantizers that follow ggml's reference
DOT_TYPES = {
    Q.F32: Q.F32, Q.F16: Q.F32, Q.BF16: Q.F32,
    Q.Q4_0: Q.Q8_0, Q.Q5_0: Q.Q8_0, Q.Q8_0: Q.Q8_0,
    Q.Q4_1: Q.Q8_1, Q.Q5_1: Q.Q8_1,
    Q.Q4_K: Q.Q8_K, Q.Q6_K: Q.Q8_K,
}

# Byte offsets of the fp16 scale fields inside one block (the rest of a block is free bits).
HALF_FIELDS = {
    Q.Q4_0: [0], Q.Q5_0: [0], Q.Q8_0: [0],
    Q.Q4_1: [0, 2], Q.Q5_1: [0, 2],
    Q.Q4_K: [0, 2],      # d, dmin
    Q.Q6_K: [208],       # d after ql[128], qh[64], scales[16]
}


@pytest.fixture(params=["simd", "scalar"])
def kernel_mode(request):
    """Run a test on the SIMD kernels and again on the forced scalar fallback."""
    setter = getattr(K, "set_force_scalar", None)
    if request.param == "scalar":
        if setter is None:
            pytest.skip("module does not expose set_force_scalar")
        setter(True)
    yield request.param
    if setter is not None:
        setter(False)


def finite_halves(rng, size, max_exp=20):
    """Random finite fp16 bit patterns (both signs, subnormals included, |v| < 2^(max_exp-15))."""
    exp = rng.integers(0, max_exp, size=size, dtype=np.uint16)
    man = rng.integers(0, 1024, size=size, dtype=np.uint16)
    sign = rng.integers(0, 2, size=size, dtype=np.uint16)
    return (sign << 15) | (exp << 10) | man


def random_blocks(qtype, n_blocks, rng, max_exp=20):
    """Random but valid bytes for n_blocks blocks: random payload, finite fp16 scales."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    if qtype == Q.F32:
        v = rng.standard_normal(n_blocks).astype(np.float32) * np.float32(10) ** rng.integers(-30, 30, n_blocks)
        return v.astype(np.float32).tobytes()
    if qtype == Q.F16:
        return rng.integers(0, 65536, size=n_blocks, dtype=np.uint16).tobytes()  # inf / nan included
    if qtype == Q.BF16:
        return rng.integers(0, 65536, size=n_blocks, dtype=np.uint16).tobytes()
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        raw[:, off:off + 2] = finite_halves(rng, n_blocks, max_exp).view(np.uint8).reshape(n_blocks, 2)
    return raw.tobytes()


def gguf_dequant(qtype, data: bytes) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(np.frombuffer(data, dtype=np.uint8), qtype), dtype=np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ----------------------------------------------------------------------------- type table

def test_type_table_matches_ggml():
    for t in Q:
        bs, ts = GGML_QUANT_SIZES[t]
        if t == Q.Q8_1:
            # gguf-py still lists the pre-2023 float layout (40 bytes); ggml's block_q8_1 is
            # {fp16 d, fp16 s, int8 qs[32]} = 36 bytes. Q8_1 never appears in GGUF files.
            ts = 36
        assert tuple(_core.type_block(int(t))) == (bs, ts), t.name
        assert _core.type_name(int(t)).lower() == t.name.lower()


@pytest.mark.parametrize("bad", [4, 5, 31, 32, 33, 36, 42, 1000, 2**32 - 1])
def test_unknown_type_ids_raise_format_error(bad):
    x = np.zeros(32, dtype=np.float32)
    with pytest.raises(x2l_edge.FormatError):
        _core.type_name(bad)
    with pytest.raises(x2l_edge.FormatError):
        K.dequantize(bad, bytes(18), 32)
    with pytest.raises(x2l_edge.FormatError):
        K.quantize(bad, x)
    with pytest.raises(x2l_edge.FormatError):
        K.vec_dot(bad, bytes(18), x)


@pytest.mark.parametrize("t", [Q.Q2_K, Q.Q3_K, Q.Q5_K, Q.IQ4_NL, Q.I8, Q.F64, Q.TQ2_0, Q.MXFP4])
def test_known_but_unsupported_types_raise_format_error(t):
    bs, ts = GGML_QUANT_SIZES[t]
    n = 256 if bs == 1 else bs
    x = np.zeros(n, dtype=np.float32)
    with pytest.raises(x2l_edge.FormatError):
        K.dequantize(int(t), bytes(n // bs * ts), n)
    with pytest.raises(x2l_edge.FormatError):
        K.quantize(int(t), x)
    with pytest.raises(x2l_edge.FormatError):
        K.vec_dot(int(t), bytes(n // bs * ts), x)


def test_bad_sizes_raise():
    with pytest.raises(x2l_edge.Error):
        K.dequantize(int(Q.Q4_0), bytes(18), 31)
    with pytest.raises(x2l_edge.Error):
        K.dequantize(int(Q.Q4_0), bytes(17), 32)
    with pytest.raises(x2l_edge.Error):
        K.quantize(int(Q.Q8_0), np.zeros(33, dtype=np.float32))


# ----------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_identical(qtype):
    rng = np.random.default_rng(1000 + int(qtype))
    bs, _ = GGML_QUANT_SIZES[qtype]
    for n_blocks in (1, 3, 64):
        n_values = n_blocks * bs if bs > 1 else 257 * n_blocks
        data = random_blocks(qtype, n_values // bs, rng)
        got = K.dequantize(int(qtype), data, n_values)
        ref = gguf_dequant(qtype, data)
        assert got.dtype == np.float32 and got.shape == (n_values,)
        if qtype == Q.F16:
            # numpy and F16C may differ only in NaN payload quieting
            nan = np.isnan(ref)
            assert np.array_equal(np.isnan(got), nan)
            assert same_bits(got[~nan], ref[~nan])
        else:
            assert same_bits(got, ref), f"{qtype.name}: first diff at {np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))[:5]}"


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_dequantize_extreme_scales(qtype):
    """Largest finite and subnormal fp16 scales stay bit-identical (products are exact in fp32)."""
    rng = np.random.default_rng(7)
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = np.frombuffer(random_blocks(qtype, 8, rng), dtype=np.uint8).reshape(8, ts).copy()
    specials = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0000, 0x8000, 0x0400], dtype=np.uint16)
    for off in HALF_FIELDS[qtype]:
        raw[:, off:off + 2] = specials.view(np.uint8).reshape(8, 2)
        specials = np.roll(specials, 3)
    data = raw.tobytes()
    assert same_bits(K.dequantize(int(qtype), data, 8 * bs), gguf_dequant(qtype, data))


# ----------------------------------------------------------------------------- quantize

def quant_inputs(rng, n):
    """Rows that exercise the rounding: plain normals at several scales, exact ties, constant
    blocks, zero blocks, blocks whose largest magnitude is negative, tiny and large values."""
    rows = []
    for scale in (1e-6, 1e-3, 1.0, 37.0, 1e4):
        rows.append(rng.standard_normal(n).astype(np.float32) * np.float32(scale))
    ties = (rng.integers(-254, 255, n) / 2).astype(np.float32)  # many x.5 values
    rows.append(ties)
    rows.append(ties / np.float32(127.0) * np.float32(3.0))
    const = np.full(n, 0.75, dtype=np.float32)
    rows.append(const)
    z = rng.standard_normal(n).astype(np.float32)
    z[:64] = 0.0
    z[64:96] = -np.abs(z[64:96]) * 5
    rows.append(z)
    return rows


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_bit_identical(qtype, kernel_mode):
    rng = np.random.default_rng(int(qtype))
    for x in quant_inputs(rng, 32 * 40):
        got = K.quantize(int(qtype), x)
        ref = gguf.quants.quantize(x, qtype).tobytes()
        assert got == ref, qtype.name


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_quantize_float_types_bit_identical(qtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(999).astype(np.float32) * np.float32(10) ** rng.integers(-9, 6, 999).astype(np.float32)
    x[:6] = [0.0, -0.0, 65504.0, 65520.0, 1e-8, np.inf]  # fp16 max, rounding to inf, subnormal
    got = K.quantize(int(qtype), x)
    with np.errstate(over="ignore"):  # 65520 -> inf is the expected fp16 rounding
        ref = gguf.quants.quantize(x, qtype).tobytes()
    assert got == ref


def decode_q8_1(data: bytes, n: int):
    b = np.frombuffer(data, dtype=np.uint8).reshape(n // 32, 36)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(-1)
    s = b[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(-1)
    q = b[:, 4:].copy().view(np.int8)
    return d, s, q


def decode_q8_k(data: bytes, n: int):
    b = np.frombuffer(data, dtype=np.uint8).reshape(n // 256, 292)
    d = b[:, 0:4].copy().view(np.float32).reshape(-1)
    q = b[:, 4:260].copy().view(np.int8)
    bsums = b[:, 260:292].copy().view(np.int16)
    return d, q, bsums


def test_quantize_q8_1_matches_ggml_reference(kernel_mode):
    """Q8_1 = Q8_0's d and qs, plus s = fp16(d * sum(qs))."""
    rng = np.random.default_rng(11)
    for x in quant_inputs(rng, 32 * 24):
        got = K.quantize(int(Q.Q8_1), x)
        d, s, q = decode_q8_1(got, x.size)
        q80 = np.frombuffer(gguf.quants.quantize(x, Q.Q8_0).tobytes(), dtype=np.uint8).reshape(-1, 34)
        assert np.array_equal(q80[:, 2:].view(np.int8), q)
        assert np.array_equal(q80[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1), d)
        d32 = (np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)).astype(np.float32)
        with np.errstate(over="ignore"):  # rows scaled by 1e4 overflow s to inf, as in ggml
            s_ref = (q.astype(np.int32).sum(axis=1).astype(np.float32) * d32).astype(np.float16).astype(np.float32)
        assert same_bits(s, s_ref)


def test_quantize_q8_k_matches_ggml_reference(kernel_mode):
    """Q8_K (ggml quantize_row_q8_K_ref): scale -127/max of the largest-magnitude value, round
    half to even, clamp at 127, float d = 1/scale, bsums = sums of 16."""
    rng = np.random.default_rng(12)
    for x in quant_inputs(rng, 256 * 5):
        got = K.quantize(int(Q.Q8_K), x)
        d, q, bsums = decode_q8_k(got, x.size)
        blocks = x.reshape(-1, 256)
        imax = np.abs(blocks).argmax(axis=1)
        mx = blocks[np.arange(len(blocks)), imax]
        for i, blk in enumerate(blocks):
            if mx[i] == 0:
                assert d[i] == 0 and not q[i].any() and not bsums[i].any()
                continue
            iscale = np.float32(-127.0) / mx[i]
            q_ref = np.minimum(127, np.rint(iscale * blk)).astype(np.int8)
            assert np.array_equal(q[i], q_ref)
            assert np.array_equal(bsums[i], q_ref.astype(np.int32).reshape(16, 16).sum(axis=1))
            assert d[i] == np.float32(1.0) / iscale


# ----------------------------------------------------------------------------- vec_dot

def activation_values(at, x: np.ndarray):
    """Activation row as the kernel sees it: (float64 values, extra info)."""
    if at == Q.F32:
        return x.astype(np.float64), None
    data = K.quantize(int(at), x)
    if at == Q.Q8_0:
        return gguf_dequant(Q.Q8_0, data).astype(np.float64), None
    if at == Q.Q8_1:
        d, s, q = decode_q8_1(data, x.size)
        return (d[:, None].astype(np.float64) * q).reshape(-1), s.astype(np.float64)
    d, q, _ = decode_q8_k(data, x.size)
    return (d[:, None].astype(np.float64) * q).reshape(-1), None


def weight_rows(qtype, n, rng):
    """A few weight rows: quantized from normals (when we have a quantizer) and random blocks."""
    bs, _ = GGML_QUANT_SIZES[qtype]
    rows = []
    if qtype in (Q.F32, Q.F16, Q.BF16) or qtype in QUANT_TYPES:
        w = rng.standard_normal(n).astype(np.float32) * np.float32(0.05)
        rows.append(K.quantize(int(qtype), w))
    if qtype not in (Q.F32, Q.F16, Q.BF16):
        rows.append(random_blocks(qtype, n // bs, rng, max_exp=12))  # |d| < 2^-3
    return rows


@pytest.mark.parametrize("qtype", list(DOT_TYPES), ids=lambda t: t.name)
def test_vec_dot_matches_reference(qtype, kernel_mode):
    rng = np.random.default_rng(500 + int(qtype))
    bs, ts = GGML_QUANT_SIZES[qtype]
    at = DOT_TYPES[qtype]
    sizes = [256, 512, 1536, 2304] if bs == 256 else [32, 64, 96, 576, 1536, 4096 + 32]
    for n in sizes:
        x = rng.standard_normal(n).astype(np.float32)
        xv, s = activation_values(at, x)
        for w_bytes in weight_rows(qtype, n, rng):
            wv = K.dequantize(int(qtype), w_bytes, n).astype(np.float64)
            got = float(K.vec_dot(int(qtype), w_bytes, x))
            mag = float(np.abs(wv * xv).sum())
            if qtype in (Q.Q4_1, Q.Q5_1):
                # exact model of the kernel: d*dy*sum(q qy) + m * s, with s the stored fp16 sum
                blk = np.frombuffer(w_bytes, dtype=np.uint8).reshape(-1, ts)
                m = blk[:, 2:4].copy().view(np.float16).astype(np.float64).reshape(-1)
                mterm = m * s
                dq = (wv.reshape(-1, 32) - m[:, None]) * xv.reshape(-1, 32)
                ref_exact = dq.sum() + mterm.sum()
                mag_exact = np.abs(dq).sum() + np.abs(mterm).sum()
                assert abs(got - ref_exact) <= RTOL_DOT * mag_exact + 1e-30, (n, got, ref_exact)
                ref = float((wv * xv).sum())
                assert abs(got - ref) <= RTOL_DOT * mag + FP16_EPS * np.abs(mterm).sum(), (n, got, ref)
            else:
                ref = float((wv * xv).sum())
                assert abs(got - ref) <= RTOL_DOT * mag + 1e-30, (qtype.name, n, got, ref, mag)


def test_vec_dot_simd_and_scalar_agree():
    setter = getattr(K, "set_force_scalar", None)
    if setter is None:
        pytest.skip("module does not expose set_force_scalar")
    rng = np.random.default_rng(9)
    try:
        for qtype in DOT_TYPES:
            bs, _ = GGML_QUANT_SIZES[qtype]
            n = 1536
            x = rng.standard_normal(n).astype(np.float32)
            for w_bytes in weight_rows(qtype, n, rng):
                setter(False)
                a = K.vec_dot(int(qtype), w_bytes, x)
                setter(True)
                b = K.vec_dot(int(qtype), w_bytes, x)
                wv = K.dequantize(int(qtype), w_bytes, n).astype(np.float64)
                mag = float(np.abs(wv * x).sum())
                assert abs(a - b) <= 2 * RTOL_DOT * mag, qtype.name
    finally:
        setter(False)


def test_vec_dot_q8_0_integer_exactness():
    """With power-of-two scales every term is exact: the kernel must return the exact dot."""
    rng = np.random.default_rng(5)
    n = 1024
    x = rng.integers(-127, 128, n).astype(np.float32)
    x[::32] = 127.0  # d = 1 for every activation block
    w = np.zeros((n // 32, 34), dtype=np.uint8)
    w[:, :2] = np.full(n // 32, 0.5, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    qw = rng.integers(-128, 128, (n // 32, 32)).astype(np.int8)
    w[:, 2:] = qw.view(np.uint8)
    exact = float((qw.astype(np.int64).reshape(-1) * x.astype(np.int64)).sum()) * 0.5
    assert K.vec_dot(int(Q.Q8_0), w.tobytes(), x) == exact


# ----------------------------------------------------------------------------- native C++ checks
# Compiled straight against cpp/cpu/quant.cpp: the exhaustive fp16 conversion check, SIMD == scalar
# for the activation quantizers, SIMD vs scalar vec_dot, vec_dot_rows == vec_dot bit for bit, and
# the gguf-py reference vectors (generated here) replayed on both kernel paths. Run natively and,
# when a cross compiler and qemu are installed, for aarch64 (NEON with and without dotprod).

CPP_CHECK = r"""
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "cpu/quant.h"
using namespace x2l;
static int fails = 0;
#define CHECK(c, ...) do { if (!(c)) { if (++fails < 20) { std::printf("FAIL: " __VA_ARGS__); std::printf("\n"); } } } while (0)
static std::mt19937_64 rng(42);
static std::normal_distribution<float> nd(0.f, 1.f);

static std::vector<uint8_t> random_row(DType t, int64_t n) {
    const TypeInfo& ti = type_info(t);
    std::vector<uint8_t> b(row_bytes(t, n));
    for (auto& v : b) v = rng() & 0xff;
    for (int64_t i = 0; i < n / ti.block_size; ++i) {
        uint8_t* p = b.data() + i * ti.block_bytes;
        uint16_t d = fp32_to_fp16(nd(rng) * 0.01f), m = fp32_to_fp16(nd(rng) * 0.01f);
        if (t == DType::Q6_K) std::memcpy(p + 208, &d, 2);
        else if (ti.block_size > 1) std::memcpy(p, &d, 2);
        if (t == DType::Q4_1 || t == DType::Q5_1 || t == DType::Q4_K) std::memcpy(p + 2, &m, 2);
    }
    if (t == DType::F16) for (int64_t i = 0; i < n; ++i) reinterpret_cast<uint16_t*>(b.data())[i] = fp32_to_fp16(nd(rng));
    if (t == DType::BF16) for (int64_t i = 0; i < n; ++i) reinterpret_cast<uint16_t*>(b.data())[i] = fp32_to_bf16(nd(rng));
    if (t == DType::F32) for (int64_t i = 0; i < n; ++i) reinterpret_cast<float*>(b.data())[i] = nd(rng);
    return b;
}

int main(int argc, char** argv) {
    // exact software half conversions == the ones in use (F16C / fcvt / software)
    for (uint32_t h = 0; h < 65536; ++h) {
        float a = fp16_to_fp32_sw((uint16_t)h), b = fp16_to_fp32((uint16_t)h);
        CHECK(std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b)), "h2f %04x", h);
        if (!std::isnan(a)) CHECK(fp32_to_fp16_sw(a) == h, "roundtrip %04x", h);
    }
    for (int i = 0; i < 2000000; ++i) {
        uint32_t u = (uint32_t)rng();
        if (i & 1) u = (u & 0x807fffffu) | ((100u + (u >> 24) % 50u) << 23);  // around the half range
        float f; std::memcpy(&f, &u, 4);
        if (!std::isnan(f)) CHECK(fp32_to_fp16_sw(f) == fp32_to_fp16(f), "f2h %08x", u);
    }
    // activation quantizers: SIMD == scalar
    for (DType at : {DType::Q8_0, DType::Q8_1, DType::Q8_K}) {
        for (int rep = 0; rep < 50; ++rep) {
            const int64_t n = 1536;
            std::vector<float> x(n);
            const float sc = std::pow(10.f, (float)(rep % 7) - 3);
            for (auto& v : x) v = nd(rng) * sc;
            if (rep % 5 == 0) for (int64_t i = 0; i < n; i += 3) x[i] = std::round(x[i] * 4) / 4;
            std::vector<uint8_t> a(row_bytes(at, n)), b(row_bytes(at, n));
            set_force_scalar(false); quantize_row(at, x.data(), a.data(), n);
            set_force_scalar(true); quantize_row(at, x.data(), b.data(), n);
            set_force_scalar(false);
            CHECK(a == b, "quantize %s rep %d: SIMD != scalar", type_info(at).name, rep);
        }
    }
    const DType types[] = {DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q5_0,
                           DType::Q5_1, DType::Q8_0, DType::Q4_K, DType::Q6_K};
    for (DType t : types) {
        const DType at = dot_type(t);
        for (int scalar = 0; scalar < 2; ++scalar) {
            for (int64_t n_rows : {1, 3, 4, 7, 13}) {
                const int64_t n = type_info(t).block_size == 256 ? 256 * (1 + n_rows % 4) : 32 * (1 + n_rows * 3);
                const size_t rb = row_bytes(t, n), stride = rb + 6;
                std::vector<uint8_t> W(stride * n_rows);
                for (int64_t r = 0; r < n_rows; ++r) { auto w = random_row(t, n); std::memcpy(&W[r * stride], w.data(), rb); }
                std::vector<float> x(n);
                for (auto& v : x) v = nd(rng);
                std::vector<uint8_t> a(at == DType::F32 ? n * 4 : row_bytes(at, n));
                quantize_row(at, x.data(), a.data(), n);
                set_force_scalar(scalar);
                std::vector<float> o(n_rows);
                vec_dot_rows(t, n, W.data(), stride, n_rows, a.data(), o.data());
                for (int64_t r = 0; r < n_rows; ++r) {
                    const float e = vec_dot(t, n, &W[r * stride], a.data());
                    CHECK(std::memcmp(&e, &o[r], 4) == 0, "vec_dot_rows %s: %g vs %g", type_info(t).name, o[r], e);
                    set_force_scalar(!scalar);
                    const float other = vec_dot(t, n, &W[r * stride], a.data());
                    set_force_scalar(scalar);
                    std::vector<float> wf(n), xf(n);
                    dequantize_row(t, &W[r * stride], wf.data(), n);
                    if (at == DType::F32) xf = x; else dequantize_row(at, a.data(), xf.data(), n);
                    double mag = 0;
                    for (int64_t i = 0; i < n; ++i) mag += std::fabs((double)wf[i] * xf[i]);
                    CHECK(std::fabs(e - other) <= 4e-5 * mag, "%s SIMD vs scalar: %g vs %g", type_info(t).name, e, other);
                }
            }
        }
        set_force_scalar(false);
    }
    // float helpers
    {
        const int64_t n = 1001;
        std::vector<float> a(n), b(n), y(n), y2(n), back(n);
        std::vector<uint16_t> h(n), h2(n);
        for (int64_t i = 0; i < n; ++i) { a[i] = nd(rng); b[i] = nd(rng); h[i] = fp32_to_fp16(a[i]); }
        double r = 0, rh = 0, mag = 0;
        for (int64_t i = 0; i < n; ++i) { r += (double)a[i] * b[i]; rh += (double)fp16_to_fp32(h[i]) * b[i]; mag += std::fabs(a[i] * b[i]); }
        CHECK(std::fabs(dot_f32(a.data(), b.data(), n) - r) < 1e-5 * mag, "dot_f32");
        CHECK(std::fabs(dot_f16_f32(h.data(), b.data(), n) - rh) < 1e-5 * mag, "dot_f16_f32");
        y = b; y2 = b;
        axpy_f32(0.5f, a.data(), y.data(), n);
        axpy_f16(0.5f, h.data(), y2.data(), n);
        fp32_to_fp16_row(a.data(), h2.data(), n);
        fp16_to_fp32_row(h2.data(), back.data(), n);
        for (int64_t i = 0; i < n; ++i) {
            CHECK(std::fabs(y[i] - (b[i] + 0.5f * a[i])) < 1e-6f, "axpy_f32");
            CHECK(std::fabs(y2[i] - (b[i] + 0.5f * fp16_to_fp32(h[i]))) < 1e-6f, "axpy_f16");
            CHECK(h2[i] == fp32_to_fp16_sw(a[i]) && back[i] == fp16_to_fp32_sw(h2[i]), "fp16 rows");
        }
    }
    // gguf-py reference vectors: [u32 kind(0 dequant, 1 quant), type, n, in_bytes, out_bytes] in out
    if (argc > 1) {
        FILE* f = std::fopen(argv[1], "rb");
        CHECK(f != nullptr, "open %s", argv[1]);
        uint32_t hd[5];
        int n_rec = 0;
        while (f && std::fread(hd, 4, 5, f) == 5) {
            std::vector<uint8_t> in(hd[3]), out(hd[4]), got(hd[4]);
            if (std::fread(in.data(), 1, hd[3], f) != hd[3] || std::fread(out.data(), 1, hd[4], f) != hd[4]) break;
            for (int scalar = 0; scalar < 2; ++scalar) {
                set_force_scalar(scalar);
                if (hd[0] == 0) dequantize_row((DType)hd[1], in.data(), reinterpret_cast<float*>(got.data()), hd[2]);
                else quantize_row((DType)hd[1], reinterpret_cast<const float*>(in.data()), got.data(), hd[2]);
                CHECK(got == out, "reference vector kind %u type %u n %u scalar %d", hd[0], hd[1], hd[2], scalar);
            }
            ++n_rec;
        }
        set_force_scalar(false);
        if (f) std::fclose(f);
        std::printf("%d reference vectors\n", n_rec);
    }
    std::printf("%s (%d failures)\n", fails ? "FAILED" : "OK", fails);
    return fails != 0;
}
"""


def write_reference_vectors(path):
    """gguf-py dequantize / quantize results for the C++ check to replay bit for bit."""
    import struct

    rng = np.random.default_rng(77)
    with open(path, "wb") as f:
        def rec(kind, t, n, a, b):
            f.write(struct.pack("<5I", kind, int(t), n, len(a), len(b)))
            f.write(a)
            f.write(b)

        for t in DEQUANT_TYPES:
            if t == Q.F16:
                continue  # NaN payload quieting may legitimately differ (checked in Python above)
            bs, _ = GGML_QUANT_SIZES[t]
            for nb in (1, 7, 64):
                n = nb * bs if bs > 1 else nb * 33
                data = random_blocks(t, n // bs, rng)
                rec(0, t, n, data, gguf_dequant(t, data).tobytes())
        for t in QUANT_TYPES + [Q.BF16]:
            for x in quant_inputs(rng, 32 * 40):
                rec(1, t, x.size, x.tobytes(), gguf.quants.quantize(x, t).tobytes())


def _compile_and_run(tmp_path, compiler, flags, runner=()):
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which(compiler) is None or (runner and shutil.which(runner[0]) is None):
        pytest.skip(f"{compiler} {' '.join(runner)} not available")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "quant_check.cpp"
    src.write_text(CPP_CHECK)
    exe = tmp_path / "quant_check"
    cmd = [compiler, "-std=c++17", "-O2", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-unused-parameter",
           *flags, f"-I{root / 'cpp'}", str(src), str(root / "cpp" / "cpu" / "quant.cpp"),
           str(root / "cpp" / "core" / "formats.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    vectors = tmp_path / "vectors.bin"
    write_reference_vectors(vectors)
    res = subprocess.run([*runner, str(exe), str(vectors)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK (0 failures)" in res.stdout


@pytest.mark.parametrize("flags", [["-march=native"], []], ids=["native", "portable"])
def test_cpp_checks_host(tmp_path, flags):
    import platform

    if not flags and platform.machine() not in ("x86_64", "AMD64"):
        flags = ["-mcpu=generic"] if platform.machine() in ("aarch64", "arm64") else []
    _compile_and_run(tmp_path, "g++", flags)


@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod+fp16"])
def test_cpp_checks_aarch64_qemu(tmp_path, march):
    """Cross-compiled NEON kernels (qemu-user): `apt-get install g++-aarch64-linux-gnu qemu-user`."""
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("native aarch64 host: covered by test_cpp_checks_host")
    _compile_and_run(tmp_path, "aarch64-linux-gnu-g++", [f"-march={march}", "-static"], runner=("qemu-aarch64", "-cpu", "max"))


def test_core_formats_are_the_kernels():
    """The user module's quantize / dequantize give what the probed kernels give."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(256).astype(np.float32)
    for qtype in (Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0):
        data = K.quantize(int(qtype), x)
        assert _core.quantize(int(qtype), x) == data
        assert same_bits(_core.dequantize(int(qtype), data, 256), K.dequantize(int(qtype), data, 256))
