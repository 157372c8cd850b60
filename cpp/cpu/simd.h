// The float vector the CPU float kernels (attention) are written against, one definition per
// instruction set, with the two numbers that shape their tiles:
//   kLanes  floats per vector      AVX-512: 16, AVX2: 8, NEON: 4, portable: 4
//   kRegs   vector registers       AVX-512: 32, AVX2: 16 (32 with AVX-512VL), NEON: 32, portable: 16
// A kernel keeps its accumulators plus its operands within kRegs, so the same source gets tiles
// that fit each target instead of one shape that spills on the narrower register files.
// -DX2L_NO_ZMM keeps AVX-512 machines on 256-bit vectors (as gemm.cpp does).
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/ops.h"  // exp_remainder: one set of exp coefficients for scalar and vector code

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(X2L_NO_ZMM)
#define X2L_SIMD_AVX512 1
#else
#define X2L_SIMD_AVX2 1
#endif
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define X2L_SIMD_NEON 1
#else
#define X2L_SIMD_PORTABLE 1
#endif

namespace x2l::simd {

#if defined(X2L_SIMD_AVX512)
constexpr int kLanes = 16, kRegs = 32;
constexpr const char* kName = "AVX-512";
struct F {
    __m512 v;
};
inline F zero() { return {_mm512_setzero_ps()}; }
inline F set1(float a) { return {_mm512_set1_ps(a)}; }
inline F load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, F a) { _mm512_storeu_ps(p, a.v); }
inline F operator+(F a, F b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F operator-(F a, F b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F operator*(F a, F b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F fmadd(F a, F b, F c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
inline F max(F a, F b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float hmax(F a) { return _mm512_reduce_max_ps(a.v); }
inline float hsum(F a) { return _mm512_reduce_add_ps(a.v); }
inline F floor(F a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
// 2^n for integer-valued n in [-127, 127]
inline F exp2i(F n) {
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23);
    return {_mm512_castsi512_ps(bits)};
}
// a where lane < n, else fill
inline F first_n(F a, int n, float fill) {
    const __mmask16 m = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n < 0 ? 0 : n)) - 1u);
    return {_mm512_mask_blend_ps(m, _mm512_set1_ps(fill), a.v)};
}
inline F load_f16(const uint16_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
// out[i] = hsum(v[i]) for i < 4
inline void hsum4(const F* v, float* out) {
    __m256 h[4];
    for (int i = 0; i < 4; ++i) h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i].v), _mm512_extractf32x8_ps(v[i].v, 1));
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}

#elif defined(X2L_SIMD_AVX2)
constexpr int kLanes = 8;
#if defined(__AVX512VL__)
constexpr int kRegs = 32;  // ymm16-31 with EVEX encodings
#else
constexpr int kRegs = 16;
#endif
constexpr const char* kName = "AVX2";
struct F {
    __m256 v;
};
inline F zero() { return {_mm256_setzero_ps()}; }
inline F set1(float a) { return {_mm256_set1_ps(a)}; }
inline F load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void store(float* p, F a) { _mm256_storeu_ps(p, a.v); }
inline F operator+(F a, F b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F operator-(F a, F b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline F operator*(F a, F b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline F fmadd(F a, F b, F c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline F max(F a, F b) { return {_mm256_max_ps(a.v, b.v)}; }
inline float hmax(F a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
inline float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline F floor(F a) { return {_mm256_floor_ps(a.v)}; }
inline F exp2i(F n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return {_mm256_castsi256_ps(bits)};
}
inline F first_n(F a, int n, float fill) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    return {_mm256_blendv_ps(_mm256_set1_ps(fill), a.v, keep)};
}
inline F load_f16(const uint16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline void hsum4(const F* v, float* out) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(v[0].v, v[1].v), _mm256_hadd_ps(v[2].v, v[3].v));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}

#elif defined(X2L_SIMD_NEON)
constexpr int kLanes = 4, kRegs = 32;
constexpr const char* kName = "NEON";
struct F {
    float32x4_t v;
};
inline F zero() { return {vdupq_n_f32(0.0f)}; }
inline F set1(float a) { return {vdupq_n_f32(a)}; }
inline F load(const float* p) { return {vld1q_f32(p)}; }
inline void store(float* p, F a) { vst1q_f32(p, a.v); }
inline F operator+(F a, F b) { return {vaddq_f32(a.v, b.v)}; }
inline F operator-(F a, F b) { return {vsubq_f32(a.v, b.v)}; }
inline F operator*(F a, F b) { return {vmulq_f32(a.v, b.v)}; }
inline F fmadd(F a, F b, F c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
inline F max(F a, F b) { return {vmaxq_f32(a.v, b.v)}; }
inline float hmax(F a) { return vmaxvq_f32(a.v); }
inline float hsum(F a) { return vaddvq_f32(a.v); }
inline F floor(F a) { return {vrndmq_f32(a.v)}; }
inline F exp2i(F n) {
    const int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n.v), vdupq_n_s32(127)), 23);
    return {vreinterpretq_f32_s32(bits)};
}
inline F first_n(F a, int n, float fill) {
    static const int32_t kLane[4] = {0, 1, 2, 3};
    const uint32x4_t keep = vcltq_s32(vld1q_s32(kLane), vdupq_n_s32(n));
    return {vbslq_f32(keep, a.v, vdupq_n_f32(fill))};
}
inline F load_f16(const uint16_t* p) { return {vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)))}; }
inline void hsum4(const F* v, float* out) { vst1q_f32(out, vpaddq_f32(vpaddq_f32(v[0].v, v[1].v), vpaddq_f32(v[2].v, v[3].v))); }

#else
// Portable: 4 lanes as a GCC/Clang vector (SSE2 on baseline x86-64, whatever the target offers elsewhere).
constexpr int kLanes = 4, kRegs = 16;
constexpr const char* kName = "portable";
typedef float f32x4 __attribute__((vector_size(16)));
struct F {
    f32x4 v;
};
inline F zero() { return {f32x4{0.0f, 0.0f, 0.0f, 0.0f}}; }
inline F set1(float a) { return {f32x4{a, a, a, a}}; }
inline F load(const float* p) {
    F r;
    std::memcpy(&r.v, p, sizeof(r.v));
    return r;
}
inline void store(float* p, F a) { std::memcpy(p, &a.v, sizeof(a.v)); }
inline F operator+(F a, F b) { return {a.v + b.v}; }
inline F operator-(F a, F b) { return {a.v - b.v}; }
inline F operator*(F a, F b) { return {a.v * b.v}; }
inline F fmadd(F a, F b, F c) { return {a.v * b.v + c.v}; }
inline F max(F a, F b) { return {a.v > b.v ? a.v : b.v}; }
inline float hmax(F a) {
    float m = a.v[0];
    for (int i = 1; i < 4; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
}
inline float hsum(F a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
inline F floor(F a) {
    F r;
    for (int i = 0; i < 4; ++i) r.v[i] = __builtin_floorf(a.v[i]);
    return r;
}
inline F exp2i(F n) {
    F r;
    for (int i = 0; i < 4; ++i) {
        const int32_t bits = (static_cast<int32_t>(n.v[i]) + 127) << 23;
        std::memcpy(&r.v[i], &bits, 4);
    }
    return r;
}
inline F first_n(F a, int n, float fill) {
    for (int i = n < 0 ? 0 : n; i < 4; ++i) a.v[i] = fill;
    return a;
}
inline F load_f16(const uint16_t* p) {
    F r;
    for (int i = 0; i < 4; ++i) r.v[i] = fp16_to_fp32(p[i]);
    return r;
}
inline void hsum4(const F* v, float* out) {
    for (int i = 0; i < 4; ++i) out[i] = hsum(v[i]);
}
#endif

inline F operator+(F a, float b) { return a + set1(b); }
inline F operator-(F a, float b) { return a - set1(b); }
inline F operator*(F a, float b) { return a * set1(b); }

// out[i] = hsum(v[i]) for i < N: four at a time where the ISA folds them together.
template <int N>
inline void hsum_n(const F* v, float* out) {
    int i = 0;
    for (; i + 4 <= N; i += 4) hsum4(v + i, out + i);
    for (; i < N; ++i) out[i] = hsum(v[i]);
}

// exp(x) for x <= 0, lane by lane: exp_neg (ops.h) on vectors.
inline F exp_neg(F x) {
    x = max(x, set1(-87.0f));
    const F n = floor(x * 1.44269504089f + 0.5f);
    return exp_remainder(x, n) * exp2i(n);
}

}  // namespace x2l::simd
