// The CPU kernels of the weight and activation formats (core/formats.h): (de)quantization and dot products.
//
// Dot products pair a weight row of type W with an activation row converted to dot_type(W)
// (e.g. Q4_1 weights with Q8_1 activations, K-quants with Q8_K), exactly as ggml does, so that
// activations are quantized once per matmul and every weight row reuses them.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/formats.h"

namespace x2l {

// src: row_bytes(t, n) bytes; dst: n floats. Bit-identical to gguf.quants.dequantize.
void dequantize_row(DType t, const void* src, float* dst, int64_t n);

// Supported for F32, F16, BF16, Q8_0, Q8_1, Q8_K, Q4_0, Q4_1, Q5_0 (ggml reference rounding).
void quantize_row(DType t, const float* src, void* dst, int64_t n);

// The activation format that vec_dot expects for weight type w (F32 for F32/F16/BF16).
DType dot_type(DType w);

// Dot product of one weight row (type w) with one activation row (type dot_type(w)); n values.
float vec_dot(DType w, int64_t n, const void* w_row, const void* act_row);

// Scalar half/bfloat16 conversions (IEEE round-to-nearest-even like numpy).
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
float bf16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);

// Bulk conversions (SIMD where available).
void fp16_to_fp32_row(const uint16_t* src, float* dst, int64_t n);
void fp32_to_fp16_row(const float* src, uint16_t* dst, int64_t n);

// Plain float helpers used by attention and norms (SIMD where available).
float dot_f32(const float* a, const float* b, int64_t n);
float dot_f16_f32(const uint16_t* a, const float* b, int64_t n);      // a: fp16 row
void axpy_f32(float a, const float* x, float* y, int64_t n);            // y += a * x
void axpy_f16(float a, const uint16_t* x, float* y, int64_t n);         // y += a * fp16 x

// out[r] = vec_dot(w, n, w_rows + r * w_stride, act_row) for r in [0, n_rows), bit-identical to
// calling vec_dot row by row (so results never depend on how rows are grouped or split between
// threads), but faster for the 32-value formats on AVX2: 4 rows share each activation block.
void vec_dot_rows(DType w, int64_t n, const void* w_rows, size_t w_stride, int64_t n_rows, const void* act_row,
                  float* out);

// ---- Test-only hooks (not for production code paths) ----
// Forces vec_dot, the activation quantizers and the float helpers onto their portable scalar
// code so tests can check it on machines that have SIMD. Process-wide; set it only while no
// other thread is computing.
void set_force_scalar(bool on);

// The exact software half conversions used when the CPU has no hardware conversion.
float fp16_to_fp32_sw(uint16_t h);
uint16_t fp32_to_fp16_sw(float f);

}  // namespace x2l
