// Register-tiled matrix multiply y[t, r] = w_row(r) · x(t) for the CPU matmul (ops.cpp).
//
// Every output value is computed by one fixed sequence of float operations that depends only on
// its weight row and its activation row, never on the tile it lands in, the thread that computes
// it or how many tokens are in the call. So results are bit-identical across thread counts, token
// batching and the single-token (decode) path, which uses the same arithmetic without repacking.
//
// The arithmetic (the portable reference gemm_reference() spells it out in scalar code):
//  - 32-value quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against Q8_0 / Q8_1 activations:
//        acc = 0; for each block b in order:
//            acc = fma(float(isum_b), dw_b * dx_b, acc)       isum_b = exact sum of q_w * q_x
//            acc = fma(mw_b, sx_b, acc)                       (Q4_1 / Q5_1 only: min times Q8_1's s)
//  - K-quants (Q4_K, Q6_K) against Q8_K, per 256-value super-block b:
//            acc = fma(float(isum_b), dw_b * dx_b, acc)       isum_b = exact sum of sub-scale * q_w * q_x
//            acc = fma(float(-msum_b), dminw_b * dx_b, acc)   (Q4_K only: msum_b = sum of mins * bsums)
//  - float weights (F32, F16, BF16) against F32 activations: 8 partial sums, lane l takes the
//    values k = l mod 8 in order with fma (the ragged tail included), then
//        ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)).
// The SIMD kernels get the integer sums exactly (the way they get them differs: VNNI, maddubs,
// offsets) and then issue exactly these float operations, one output per vector lane (quantized)
// or one output per vector (float); they are bit-identical to the reference.
#pragma once
#include <cstddef>
#include <cstdint>

#include "cpu/quant.h"

namespace x2l {

// True when gemm() has a kernel for weights of type w in this build (otherwise the caller keeps
// using vec_dot_rows, for every token count so that the results stay batch-independent).
bool gemm_supported(DType w);

// Activations as the kernels read them, built once per matmul call and dot type.
struct GemmActs {
    DType type = DType::F32;  // F32, Q8_0, Q8_1 or Q8_K
    int64_t n_tokens = 0, n_in = 0;
    const float* x = nullptr;  // F32: [n_tokens, n_in]
    // Quantized, nb = n_in / block size, per token t and block b at [t * nb + b]:
    const int8_t* qs = nullptr;     // block values, [t][b][32 or 256]
    const float* d = nullptr;       // block scale
    const float* s = nullptr;       // Q8_1: s as stored (fp16 of d * sum q), as float
    const int32_t* sum = nullptr;   // sum of the block's values (Q8_K: unused)
    const int16_t* bsums = nullptr; // Q8_K: the 16 sums of 16 values, [t][b][16]
    const int16_t* bsums32 = nullptr;  // Q8_K: the 8 sums of 32 values, [t][b][8]
};

// Bytes of buffer that gemm_acts() needs for n_tokens rows of dot type `at` (0 for F32).
size_t gemm_acts_bytes(DType at, int64_t n_tokens, int64_t n_in);
// A view of buf laid out for n_tokens rows; x is used for F32 and may be null otherwise.
GemmActs gemm_acts(DType at, const float* x, int64_t n_tokens, int64_t n_in, uint8_t* buf);
// Fills token t of the view from its row quantized with quantize_row(at, ...). Tokens may be
// packed concurrently.
void gemm_pack_token(const GemmActs& a, int64_t t, const void* qrow);

// y[t * ldy + r] = w_row(r) · x(t) (+ bias[r]) for rows r in [r0, r1) and every token of `a`.
// w: weight rows of type wt (a.type must be dot_type(wt)), w_stride bytes apart; row r at
// w + r * w_stride. Runs on the calling thread (callers split rows between threads).
void gemm(DType wt, const uint8_t* w, size_t w_stride, int64_t r0, int64_t r1, const GemmActs& a, float* y,
          int64_t ldy, const float* bias);

// ---- Test hooks ----
// The documented arithmetic in plain scalar code, for any type gemm_supported() may report on
// any build: the SIMD kernels must match it bit for bit.
void gemm_reference(DType wt, const uint8_t* w, size_t w_stride, int64_t r0, int64_t r1, const GemmActs& a,
                    float* y, int64_t ldy, const float* bias);

}  // namespace x2l
