"""The CPU matmul's tiled kernels (cpp/cpu/gemm.cpp) against the per-row vec_dot path.

For every weight type with a tiled kernel in this build, on random weights (quantized by
_core.quantize; K-quants as random valid blocks, the core has no quantizer for them):
- matmul equals the documented scalar arithmetic (gemm_reference) bit for bit: the SIMD kernels
  compute the same exact integer block sums and then the same float operations per output;
- matmul stays within RTOL of one vec_dot per output (the two differ only in float summation
  order), relative to sum_k |w_k x_k| of the dequantized weights;
- results are bit-identical across thread counts, across splitting the tokens into batches
  (1-token batches included: decode uses the same per-output arithmetic) and in fused calls;
- bias is added after the dot product.
"""
from __future__ import annotations

import numpy as np
import pytest

import probes
from x2l_edge import _core


@pytest.fixture(scope="module")
def g():
    return probes.require()  # matmul_test, gemm_reference, ... live in the test module x2l_edge._testing


# ggml type ids
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 14, 30
TYPES = {"q8_0": Q8_0, "q4_1": Q4_1, "q4_0": Q4_0, "f16": F16, "f32": F32, "q5_0": Q5_0, "q5_1": Q5_1,
         "bf16": BF16, "q4_k": Q4_K, "q6_k": Q6_K}
TOKENS = [1, 3, 4, 5, 17, 64, 257]

# |matmul - vec_dot| <= RTOL * sum_k |w_k x_k|. Both sum exact integer products per block (or
# exact float products) in float32; only the order of the float additions differs, so the gap is
# a few ulps of the magnitude (measured < 2e-7 here).
RTOL = 1e-6


def _n_in(type_id):
    if type_id in (Q4_K, Q6_K):
        return 512
    if type_id in (F32, F16, BF16):
        return 100  # not a multiple of 8: the ragged tail path
    return 96


def _k_blocks(type_id, n_blocks, rng):
    """Random valid K-quant blocks (no quantizer for them in the core): random bits, sane fp16 scales."""
    size = {Q4_K: 144, Q6_K: 210}[type_id]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if type_id == Q4_K:  # d, dmin at bytes 0 and 2
        raw[:, 0:2] = (rng.uniform(0.001, 0.01, n_blocks).astype(np.float16)).view(np.uint8).reshape(-1, 2)
        raw[:, 2:4] = (rng.uniform(0.001, 0.01, n_blocks).astype(np.float16)).view(np.uint8).reshape(-1, 2)
    else:  # d at byte 208
        raw[:, 208:210] = (rng.uniform(0.0005, 0.005, n_blocks).astype(np.float16)).view(np.uint8).reshape(-1, 2)
    return raw.tobytes()


def _weights(type_id, n_out, n_in, seed):
    rng = np.random.default_rng(seed)
    if type_id in (Q4_K, Q6_K):
        data = _k_blocks(type_id, n_out * n_in // 256, rng)
    else:
        w = (rng.standard_normal((n_out, n_in)) * 0.1).astype(np.float32)
        w[:, :5] += 0.3  # a shifted block start so that Q4_1/Q5_1 mins are not all symmetric
        data = b"".join(_core.quantize(type_id, w[r].copy()) for r in range(n_out))
    deq = np.stack([_core.dequantize(type_id, data[r * len(data) // n_out:(r + 1) * len(data) // n_out], n_in)
                    for r in range(n_out)])
    return data, deq


def _x(T, n_in, seed):
    return np.random.default_rng(seed).standard_normal((T, n_in)).astype(np.float32)


@pytest.fixture(scope="module", params=list(TYPES))
def case(request, g):
    name = request.param
    type_id = TYPES[name]
    if not g.gemm_supported(type_id):
        pytest.skip(f"no tiled kernel for {name} in this build")
    n_in = _n_in(type_id)
    data, deq = _weights(type_id, 45, n_in, seed=type_id)  # 45 rows: a ragged 16-row / 8-row group
    return type_id, data, deq, n_in


@pytest.mark.parametrize("T", TOKENS)
def test_matches_reference_and_vec_dot(g, case, T):
    type_id, data, deq, n_in = case
    x = _x(T, n_in, seed=100 + T)
    y = g.matmul_test(type_id, data, n_in, x, 1)
    assert y.shape == (T, deq.shape[0])
    np.testing.assert_array_equal(y, g.gemm_reference(type_id, data, n_in, x))
    vd = g.vec_dot_matrix(type_id, data, n_in, x)
    mag = np.abs(x) @ np.abs(deq).T
    err = np.abs(y - vd) / mag
    assert err.max() <= RTOL, f"max |matmul - vec_dot| / sum|w x| = {err.max():.2e}"


@pytest.mark.parametrize("T", TOKENS)
def test_thread_count_and_batching_do_not_change_results(g, case, T):
    type_id, data, _, n_in = case
    x = _x(T, n_in, seed=200 + T)
    want = g.matmul_test(type_id, data, n_in, x, 1)
    for n_threads in (2, 3):
        np.testing.assert_array_equal(g.matmul_test(type_id, data, n_in, x, n_threads), want)
    splits = {1, T // 2, T - 1, 5}
    for s in sorted(k for k in splits if 0 < k < T):
        parts = [x[:s], x[s:]]
        got = np.concatenate([g.matmul_test(type_id, data, n_in, p, 2) for p in parts])
        np.testing.assert_array_equal(got, want, err_msg=f"split at {s}")
    if T <= 17:  # one token at a time, as decode does
        got = np.concatenate([g.matmul_test(type_id, data, n_in, x[t:t + 1], 1) for t in range(T)])
        np.testing.assert_array_equal(got, want)


def test_bias(g, case):
    type_id, data, deq, n_in = case
    x = _x(9, n_in, seed=7)
    bias = np.random.default_rng(8).standard_normal(deq.shape[0]).astype(np.float32)
    y = g.matmul_test(type_id, data, n_in, x, 2)
    for T in (1, 9):
        np.testing.assert_array_equal(g.matmul_test(type_id, data, n_in, x[:T], 2, bias), y[:T] + bias)


@pytest.mark.parametrize("T", [1, 6, 40])
def test_fused_jobs_equal_separate_calls(g, T):
    """q/k/v-style fused calls: several weights, mixed types, one parallel region."""
    n_in = 256
    types = [Q4_0, Q8_0, Q4_1, F16, Q5_1, F32, Q4_K, Q6_K]
    sizes = [40, 24, 33, 16, 8, 5, 19, 9]
    weights = [_weights(t, n, n_in, seed=i)[0] for i, (t, n) in enumerate(zip(types, sizes))]
    x = _x(T, n_in, seed=11)
    for n_threads in (1, 2, 3):
        outs = g.matmul_fused_test(list(zip(types, weights)), n_in, x, n_threads)
        for t, w, y in zip(types, weights, outs):
            np.testing.assert_array_equal(y, g.matmul_test(t, w, n_in, x, 1))


@pytest.mark.parametrize("name", ["q4_1", "q8_0", "f16", "q4_k", "q6_k"])
def test_realistic_shape(g, name):
    """A SmolLM2-sized projection (several 16-row groups, token blocks, tail tiles)."""
    type_id = TYPES[name]
    if not g.gemm_supported(type_id):
        pytest.skip(f"no tiled kernel for {name} in this build")
    n_in, n_out = (768 if type_id in (Q4_K, Q6_K) else 576), 200
    data, deq = _weights(type_id, n_out, n_in, seed=5)
    x = _x(300, n_in, seed=6)
    y = g.matmul_test(type_id, data, n_in, x, 2)
    np.testing.assert_array_equal(y, g.gemm_reference(type_id, data, n_in, x))
    err = np.abs(y - g.vec_dot_matrix(type_id, data, n_in, x)) / (np.abs(x) @ np.abs(deq).T)
    assert err.max() <= RTOL
