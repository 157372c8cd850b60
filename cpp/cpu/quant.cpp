// Weight and activation formats: ggml block layouts, (de)quantization and dot-product kernels.
//
// Layout of this file:
//   1. half / bfloat16 conversions (exact, IEEE round-to-nearest-even)
//   2. block structs and the type table
//   3. dequantize_row / quantize_row (reference arithmetic, bit-identical to gguf-py)
//   4. dot kernels: a portable scalar reference for every type, then AVX2+FMA (x86-64) and
//      NEON (aarch64) versions; vec_dot picks the SIMD one unless set_force_scalar(true).
//      vec_dot_rows runs 4 weight rows per activation pass (AVX2, 32-value formats).
//   5. plain float helpers (dot_f32, axpy, fp16 rows).
//
// Every SIMD kernel computes the same integer block sums as the scalar reference, so the two
// differ only by float summation order (a few ulp of the result). The activation quantizers'
// SIMD versions are bit-identical to their scalar versions.
#include "cpu/quant.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>

#include "core/common.h"

#if defined(__AVX2__) && defined(__FMA__)
#define X2L_AVX2 1
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define X2L_NEON 1
#include <arm_neon.h>
#endif
#if defined(__F16C__) && !defined(X2L_AVX2)
#include <immintrin.h>
#endif

namespace x2l {

namespace {

// Test-only switch (see set_force_scalar); relaxed: it is only flipped between test cases.
std::atomic<bool> g_force_scalar{false};

inline bool use_simd() {
#if defined(X2L_AVX2) || defined(X2L_NEON)
    return !g_force_scalar.load(std::memory_order_relaxed);
#else
    return false;
#endif
}

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Hides v from the optimizer so that the product that produced it is rounded to float before
// the next add. GCC contracts a*b+c into an FMA by default (-ffp-contract=fast), which would
// change the rounding of the reference quantizers that gguf-py computes unfused in numpy.
template <class T>
[[maybe_unused]] inline T opaque(T v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__("" : "+w"(v));
#else
    volatile T t = v;
    v = t;
#endif
    return v;
}

// ------------------------------------------------------------------------------ 1. half / bf16
// Software conversions; exact for every input (numpy's semantics, NaN payloads kept).
float half_to_float_sw(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (exp == 0) {
        // zero or subnormal: man * 2^-24, exact in float
        float v = static_cast<float>(man) * 5.9604644775390625e-8f;
        return bits_f32(f32_bits(v) | sign);
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t float_to_half_sw(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {  // inf / nan (nan: keep the top payload bits, never turn into inf)
        if (ax == 0x7f800000u) return sign | 0x7c00u;
        uint16_t m = static_cast<uint16_t>((ax >> 13) & 0x3ffu);
        return sign | 0x7c00u | (m ? m : 1u);
    }
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
    if (ax >= 0x38800000u) {                        // normal half (>= 2^-14)
        ax += 0xfffu + ((ax >> 13) & 1u);           // round to nearest even at bit 13
        return sign | static_cast<uint16_t>((ax - 0x38000000u) >> 13);
    }
    if (ax < 0x33000000u) return sign;  // < 2^-25: rounds to zero (2^-25 itself ties to 0)
    // subnormal half: count units of 2^-24, round to nearest even
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;  // may carry into the smallest normal: fine
    return sign | static_cast<uint16_t>(q);
}

inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(X2L_NEON)
    __fp16 v;
    std::memcpy(&v, &h, 2);
    return static_cast<float>(v);
#else
    return half_to_float_sw(h);
#endif
}

inline uint16_t f2h(float f) {
#if defined(__F16C__)
    return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    return float_to_half_sw(f);
#endif
}

// ggml_compute_fp32_to_bf16: quiet NaNs, round to nearest even.
inline uint16_t f2bf(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64u);
    return static_cast<uint16_t>((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}
inline float bf2f(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

#if !defined(X2L_NEON)
// Half -> float bits for all 65536 halves, built at compile time (256 KB of read-only data).
// The dot kernels read their per-block scales through it: one load instead of the
// insert + vcvtph2ps sequence, which is the difference between ~3.7 and ~5 cycles per Q8_0
// block (the same trick ggml uses on x86).
constexpr uint32_t half_bits_to_f32_bits(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {
        if (man == 0) return sign;
        uint32_t shifts = 0;  // subnormal: normalize the mantissa
        while (!(man & 0x400u)) {
            man <<= 1;
            ++shifts;
        }
        return sign | ((113u - shifts) << 23) | ((man & 0x3ffu) << 13);
    }
    if (exp == 31) return sign | 0x7f800000u | (man << 13);
    return sign | ((exp + 112u) << 23) | (man << 13);
}
struct HalfTable {
    uint32_t bits[65536];
};
constexpr HalfTable make_half_table() {
    HalfTable t{};
    for (uint32_t h = 0; h < 65536; ++h) t.bits[h] = half_bits_to_f32_bits(h);
    return t;
}
constexpr HalfTable kHalfTable = make_half_table();

// Scale conversion inside dot kernels.
inline float hs(uint16_t h) {
    float f;
    std::memcpy(&f, &kHalfTable.bits[h], 4);
    return f;
}
#else
inline float hs(uint16_t h) { return h2f(h); }  // a single fcvt on aarch64
#endif

// ------------------------------------------------------------------------------ 2. blocks
inline uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// Q4_K / Q5_K 6-bit scales and mins, 8 of each packed in 12 bytes:
//   bytes 0-3: low 6 bits = scale 0-3, top 2 bits = high bits of scale 4-7
//   bytes 4-7: low 6 bits = min 0-3,   top 2 bits = high bits of min 4-7
//   bytes 8-11: low nibble = low bits of scale 4-7, high nibble = low bits of min 4-7
inline void unpack_k4_scales(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = static_cast<uint8_t>((s[j + 8] & 0x0f) | ((s[j] >> 6) << 4));
        mn[j + 4] = static_cast<uint8_t>((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

// Q4_K nibbles in value order: 64-value chunk c = low nibbles of qs[32c..] then high nibbles.
inline void unpack_q4_k(const BlockQ4_K& b, uint8_t q[QK_K]) {
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
            q[64 * c + l] = b.qs[32 * c + l] & 0x0f;
            q[64 * c + 32 + l] = b.qs[32 * c + l] >> 4;
        }
}

// Q6_K values (-32..31) in value order. Each 128-value half h uses ql[64h..+64], qh[32h..+32]:
// value 32k+l (k = 0..3) = nibble (k&1 ? ql[l+32] : ql[l], high nibble when k >= 2) | 2 bits of qh[l] at 2k.
inline void unpack_q6_k(const BlockQ6_K& b, int8_t q[QK_K]) {
    for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = b.ql + 64 * h;
        const uint8_t* qh = b.qh + 32 * h;
        int8_t* o = q + 128 * h;
        for (int l = 0; l < 32; ++l) {
            o[l] = static_cast<int8_t>(((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32);
            o[l + 32] = static_cast<int8_t>(((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32);
            o[l + 64] = static_cast<int8_t>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            o[l + 96] = static_cast<int8_t>(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

[[noreturn]] void unsupported(const char* what, DType t) {
    const TypeInfo* ti = type_info(static_cast<uint32_t>(t));
    throw FormatError(std::string(what) + ": unsupported type " +
                      (ti ? ti->name : std::to_string(static_cast<uint32_t>(t))));
}

// ------------------------------------------------------------------------------ 3a. dequantize
// Float order follows gguf-py. Every product below is exact in float32 (an 11-bit half
// mantissa times small integers stays under 24 bits), so a fused multiply-add gives the same
// result as numpy's separate multiply and add.

void dequant_q4_0(const BlockQ4_0* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK) {
        const float d = h2f(b[i].d);
        for (int j = 0; j < 16; ++j) {
            y[j] = d * static_cast<float>((b[i].qs[j] & 0x0f) - 8);
            y[j + 16] = d * static_cast<float>((b[i].qs[j] >> 4) - 8);
        }
    }
}

void dequant_q4_1(const BlockQ4_1* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK) {
        const float d = h2f(b[i].d), m = h2f(b[i].m);
        for (int j = 0; j < 16; ++j) {
            y[j] = d * static_cast<float>(b[i].qs[j] & 0x0f) + m;
            y[j + 16] = d * static_cast<float>(b[i].qs[j] >> 4) + m;
        }
    }
}

void dequant_q5_0(const BlockQ5_0* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK) {
        const float d = h2f(b[i].d);
        const uint32_t qh = load_u32(b[i].qh);
        for (int j = 0; j < 16; ++j) {
            int lo = (b[i].qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4);
            int hi = (b[i].qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
            y[j] = d * static_cast<float>(lo - 16);
            y[j + 16] = d * static_cast<float>(hi - 16);
        }
    }
}

void dequant_q5_1(const BlockQ5_1* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK) {
        const float d = h2f(b[i].d), m = h2f(b[i].m);
        const uint32_t qh = load_u32(b[i].qh);
        for (int j = 0; j < 16; ++j) {
            int lo = (b[i].qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4);
            int hi = (b[i].qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
            y[j] = d * static_cast<float>(lo) + m;
            y[j + 16] = d * static_cast<float>(hi) + m;
        }
    }
}

void dequant_q8_0(const BlockQ8_0* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK) {
        const float d = h2f(b[i].d);
        for (int j = 0; j < QK; ++j) y[j] = static_cast<float>(b[i].qs[j]) * d;
    }
}

void dequant_q8_1(const BlockQ8_1* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK) {
        const float d = h2f(b[i].d);
        for (int j = 0; j < QK; ++j) y[j] = static_cast<float>(b[i].qs[j]) * d;
    }
}

void dequant_q4_k(const BlockQ4_K* b, float* y, int64_t nb) {
    uint8_t q[QK_K], sc[8], mn[8];
    for (int64_t i = 0; i < nb; ++i, y += QK_K) {
        const float d = h2f(b[i].d), dmin = h2f(b[i].dmin);
        unpack_k4_scales(b[i].scales, sc, mn);
        unpack_q4_k(b[i], q);
        for (int s = 0; s < 8; ++s) {
            const float ds = d * static_cast<float>(sc[s]), dm = dmin * static_cast<float>(mn[s]);
            for (int l = 0; l < 32; ++l) y[32 * s + l] = ds * static_cast<float>(q[32 * s + l]) - dm;
        }
    }
}

void dequant_q6_k(const BlockQ6_K* b, float* y, int64_t nb) {
    int8_t q[QK_K];
    for (int64_t i = 0; i < nb; ++i, y += QK_K) {
        const float d = h2f(b[i].d);
        unpack_q6_k(b[i], q);
        for (int g = 0; g < 16; ++g) {
            const float ds = d * static_cast<float>(b[i].scales[g]);
            for (int l = 0; l < 16; ++l) y[16 * g + l] = ds * static_cast<float>(q[16 * g + l]);
        }
    }
}

void dequant_q8_k(const BlockQ8_K* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += QK_K)
        for (int j = 0; j < QK_K; ++j) y[j] = b[i].d * static_cast<float>(b[i].qs[j]);
}

// ------------------------------------------------------------------------------ 3b. quantize
// Legacy weight formats: ggml's reference rounding (the formulas gguf-py reproduces).

// Signed value of largest magnitude (first one on ties), as ggml picks it.
inline float signed_absmax(const float* x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; ++j) {
        if (amax < std::fabs(x[j])) {
            amax = std::fabs(x[j]);
            max = x[j];
        }
    }
    return max;
}

void quant_q4_0(const float* x, BlockQ4_0* b, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        const float d = signed_absmax(x, QK) / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = f2h(d);
        for (int j = 0; j < 16; ++j) {
            // trunc(x*id + 8.5) with the product rounded first, clamped to 15
            int q0 = static_cast<int>(opaque(x[j] * id) + 8.5f);
            int q1 = static_cast<int>(opaque(x[j + 16] * id) + 8.5f);
            b[i].qs[j] = static_cast<uint8_t>(std::min(15, q0) | (std::min(15, q1) << 4));
        }
    }
}

void quant_q4_1(const float* x, BlockQ4_1* b, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float mn = x[0], mx = x[0];
        for (int j = 1; j < QK; ++j) {
            mn = std::min(mn, x[j]);
            mx = std::max(mx, x[j]);
        }
        const float d = (mx - mn) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = f2h(d);
        b[i].m = f2h(mn);
        for (int j = 0; j < 16; ++j) {
            int q0 = static_cast<int>(opaque((x[j] - mn) * id) + 0.5f);
            int q1 = static_cast<int>(opaque((x[j + 16] - mn) * id) + 0.5f);
            b[i].qs[j] = static_cast<uint8_t>(std::min(15, q0) | (std::min(15, q1) << 4));
        }
    }
}

void quant_q5_0(const float* x, BlockQ5_0* b, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        const float d = signed_absmax(x, QK) / -16.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = f2h(d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; ++j) {
            int q0 = std::min(31, static_cast<int>(opaque(x[j] * id) + 16.5f));
            int q1 = std::min(31, static_cast<int>(opaque(x[j + 16] * id) + 16.5f));
            b[i].qs[j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
            qh |= static_cast<uint32_t>(q0 >> 4) << j;
            qh |= static_cast<uint32_t>(q1 >> 4) << (j + 16);
        }
        std::memcpy(b[i].qh, &qh, 4);
    }
}

void quant_q5_1(const float* x, BlockQ5_1* b, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float mn = x[0], mx = x[0];
        for (int j = 1; j < QK; ++j) {
            mn = std::min(mn, x[j]);
            mx = std::max(mx, x[j]);
        }
        const float d = (mx - mn) / 31.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = f2h(d);
        b[i].m = f2h(mn);
        uint32_t qh = 0;
        for (int j = 0; j < 16; ++j) {
            int q0 = std::min(31, static_cast<int>(opaque((x[j] - mn) * id) + 0.5f));
            int q1 = std::min(31, static_cast<int>(opaque((x[j + 16] - mn) * id) + 0.5f));
            b[i].qs[j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
            qh |= static_cast<uint32_t>(q0 >> 4) << j;
            qh |= static_cast<uint32_t>(q1 >> 4) << (j + 16);
        }
        std::memcpy(b[i].qh, &qh, 4);
    }
}

// Q8_0 / Q8_1: d = amax/127, q = roundf(x/d) (half away from zero). Returns sum(q) for Q8_1.
inline int quant_block_q8(const float* x, int8_t* qs, float* d_out) {
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
        qs[j] = static_cast<int8_t>(std::round(x[j] * id));
        sum += qs[j];
    }
    *d_out = d;
    return sum;
}

void quant_q8_0_ref(const float* x, BlockQ8_0* b, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float d;
        quant_block_q8(x, b[i].qs, &d);
        b[i].d = f2h(d);
    }
}

void quant_q8_1_ref(const float* x, BlockQ8_1* b, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float d;
        int sum = quant_block_q8(x, b[i].qs, &d);
        b[i].d = f2h(d);
        b[i].s = f2h(static_cast<float>(sum) * d);
    }
}

// Q8_K (ggml quantize_row_q8_K_ref): scale so the largest-magnitude value maps to -127,
// round half to even, float d; bsums hold the sums of each 16 values.
void quant_q8_k_ref(const float* x, BlockQ8_K* b, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK_K) {
        const float max = signed_absmax(x, QK_K);
        if (max == 0.0f) {
            std::memset(&b[i], 0, sizeof(BlockQ8_K));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; ++j)
            b[i].qs[j] = static_cast<int8_t>(std::min(127, static_cast<int>(std::nearbyint(iscale * x[j]))));
        for (int g = 0; g < QK_K / 16; ++g) {
            int s = 0;
            for (int l = 0; l < 16; ++l) s += b[i].qs[16 * g + l];
            b[i].bsums[g] = static_cast<int16_t>(s);
        }
        b[i].d = 1.0f / iscale;
    }
}

// ------------------------------------------------------------------------------ 4a. scalar dots
// Integer sums per block, one float multiply-add per block, as ggml does.

float dot_f32_ref(const float* a, const float* b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

float dot_f16_ref(const uint16_t* a, const float* b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += h2f(a[i]) * b[i];
    return s;
}

float dot_bf16_ref(const uint16_t* a, const float* b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += bf2f(a[i]) * b[i];
    return s;
}

float vd_f32_ref(int64_t n, const void* w, const void* a) {
    return dot_f32_ref(static_cast<const float*>(w), static_cast<const float*>(a), n);
}
float vd_f16_ref(int64_t n, const void* w, const void* a) {
    return dot_f16_ref(static_cast<const uint16_t*>(w), static_cast<const float*>(a), n);
}
float vd_bf16_ref(int64_t n, const void* w, const void* a) {
    return dot_bf16_ref(static_cast<const uint16_t*>(w), static_cast<const float*>(a), n);
}

// Scalar block dots: integer sums of one block.
inline int dot32_i8(const int8_t* q, const int8_t* y) {
    int s = 0;
    for (int j = 0; j < QK; ++j) s += q[j] * y[j];
    return s;
}

// sum(nibble * y) over a 4-bit block: low nibbles pair with y[0..15], high with y[16..31].
inline int dot_nibbles(const uint8_t* qs, const int8_t* y) {
    int lo = 0, hi = 0;
    for (int j = 0; j < 16; ++j) lo += (qs[j] & 0x0f) * y[j];
    for (int j = 0; j < 16; ++j) hi += (qs[j] >> 4) * y[j + 16];
    return lo + hi;
}

inline int sum32_i8(const int8_t* y) {
    int s = 0;
    for (int j = 0; j < QK; ++j) s += y[j];
    return s;
}

// sum(q5 * y) with the 5-bit values (nibble | qh bit << 4) - offset.
inline int dot_q5(const uint8_t* qs, const uint8_t* qh_bytes, int offset, const int8_t* y) {
    const uint32_t qh = load_u32(qh_bytes);
    int s = 0;
    for (int j = 0; j < 16; ++j) {
        const int lo = ((qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4)) - offset;
        const int hi = ((qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4)) - offset;
        s += lo * y[j] + hi * y[j + 16];
    }
    return s;
}

float vd_q4_0_ref(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK; ++i) {
        const int sumi = dot_nibbles(x[i].qs, y[i].qs) - 8 * sum32_i8(y[i].qs);  // values are nibble - 8
        acc += static_cast<float>(sumi) * (h2f(x[i].d) * h2f(y[i].d));
    }
    return acc;
}

float vd_q4_1_ref(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_1*>(w);
    const auto* y = static_cast<const BlockQ8_1*>(a);
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK; ++i) {
        const int sumi = dot_nibbles(x[i].qs, y[i].qs);
        // sum(d q + m)(dy qy) = d dy sum(q qy) + m (dy sum qy), the last factor being Q8_1's s
        acc += static_cast<float>(sumi) * (h2f(x[i].d) * h2f(y[i].d)) + h2f(x[i].m) * h2f(y[i].s);
    }
    return acc;
}

float vd_q5_0_ref(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK; ++i) {
        const int sumi = dot_q5(x[i].qs, x[i].qh, 16, y[i].qs);
        acc += static_cast<float>(sumi) * (h2f(x[i].d) * h2f(y[i].d));
    }
    return acc;
}

float vd_q5_1_ref(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_1*>(w);
    const auto* y = static_cast<const BlockQ8_1*>(a);
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK; ++i) {
        const int sumi = dot_q5(x[i].qs, x[i].qh, 0, y[i].qs);
        acc += static_cast<float>(sumi) * (h2f(x[i].d) * h2f(y[i].d)) + h2f(x[i].m) * h2f(y[i].s);
    }
    return acc;
}

float vd_q8_0_ref(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ8_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK; ++i)
        acc += static_cast<float>(dot32_i8(x[i].qs, y[i].qs)) * (h2f(x[i].d) * h2f(y[i].d));
    return acc;
}

float vd_q4_k_ref(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    uint8_t q[QK_K], sc[8], mn[8];
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        unpack_k4_scales(x[i].scales, sc, mn);
        unpack_q4_k(x[i], q);
        int sumi = 0, summ = 0;
        for (int s = 0; s < 8; ++s) {
            int dot = 0;
            for (int l = 0; l < 32; ++l) dot += q[32 * s + l] * y[i].qs[32 * s + l];
            sumi += sc[s] * dot;
            summ += mn[s] * (y[i].bsums[2 * s] + y[i].bsums[2 * s + 1]);
        }
        // sum(d sc q - dmin mn)(dy qy) = dy (d sum(sc q qy) - dmin sum(mn sum qy))
        acc += y[i].d * (h2f(x[i].d) * static_cast<float>(sumi) - h2f(x[i].dmin) * static_cast<float>(summ));
    }
    return acc;
}

float vd_q6_k_ref(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ6_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    int8_t q[QK_K];
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        unpack_q6_k(x[i], q);
        int sumi = 0;
        for (int g = 0; g < 16; ++g) {
            int dot = 0;
            for (int l = 0; l < 16; ++l) dot += q[16 * g + l] * y[i].qs[16 * g + l];
            sumi += x[i].scales[g] * dot;
        }
        acc += (h2f(x[i].d) * y[i].d) * static_cast<float>(sumi);
    }
    return acc;
}

// ------------------------------------------------------------------------------ 4b. AVX2 + FMA
#if defined(X2L_AVX2)

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

// [32 x u8] . [32 x s8] -> 8 x i32, each lane the sum of 4 adjacent products. Exact for our
// operands: |u| <= 63 (or 128 against |s| <= 127), so maddubs' int16 pairs never saturate.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Signed x signed via |a| . (b * sign a).
inline __m256i dot_s8s8(__m256i a, __m256i b) {
    return dot_u8s8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

// 16 packed bytes -> 32 nibbles in value order (low nibbles = values 0-15, high = 16-31).
// Broadcast-load + per-lane variable shift avoids a cross-lane insert.
inline __m256i unpack_nibbles(const uint8_t* qs) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    const __m256i shifted = _mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4));
    return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0f));
}

// 32 bits -> 32 bytes, byte j = 0xff when bit j is set.
inline __m256i expand_bits(uint32_t bits) {
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), pick);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

inline __m256i loadu256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// ---- 32-value formats: R weight rows against one activation row.
// vec_dot runs these with R = 1, vec_dot_rows with R = 4 (the activation block is loaded and
// its scale converted once for all R rows). Per row the arithmetic is fixed: two FMA chains
// (even / odd blocks of the unrolled part, leftover blocks on chain 0), so a row's result is
// bit-identical whether it is computed alone or in a group, and never depends on how a caller
// splits rows between threads.

// Integer block dots against Q8_0 activations. corr(qy) is activation-only work, shared by
// the R rows. [32 q] . [32 qy] -> 8 x i32 partial sums.
struct IdotQ8_0 {
    using Block = BlockQ8_0;
    static __m256i corr(__m256i) { return _mm256_setzero_si256(); }
    static __m256i dot(const Block& b, __m256i qy, __m256i) { return dot_s8s8(loadu256(b.qs), qy); }
};
struct IdotQ4_0 {
    using Block = BlockQ4_0;
    // sum((q - 8) qy) = sum(q qy) - 8 sum(qy)
    static __m256i corr(__m256i qy) { return dot_u8s8(_mm256_set1_epi8(8), qy); }
    static __m256i dot(const Block& b, __m256i qy, __m256i c) {
        return _mm256_sub_epi32(dot_u8s8(unpack_nibbles(b.qs), qy), c);
    }
};
struct IdotQ5_0 {
    using Block = BlockQ5_0;
    static __m256i corr(__m256i qy) { return dot_u8s8(_mm256_set1_epi8(16), qy); }
    static __m256i dot(const Block& b, __m256i qy, __m256i c) {
        const __m256i hb = _mm256_and_si256(expand_bits(load_u32(b.qh)), _mm256_set1_epi8(16));
        const __m256i q = _mm256_or_si256(unpack_nibbles(b.qs), hb);  // 0..31, value q - 16
        return _mm256_sub_epi32(dot_u8s8(q, qy), c);
    }
};
// Against Q8_1 activations (unsigned q; the min m enters through Q8_1's s).
struct IdotQ4_1 {
    using Block = BlockQ4_1;
    static __m256i dot(const Block& b, __m256i qy) { return dot_u8s8(unpack_nibbles(b.qs), qy); }
};
struct IdotQ5_1 {
    using Block = BlockQ5_1;
    static __m256i dot(const Block& b, __m256i qy) {
        const __m256i hb = _mm256_and_si256(expand_bits(load_u32(b.qh)), _mm256_set1_epi8(16));
        return dot_u8s8(_mm256_or_si256(unpack_nibbles(b.qs), hb), qy);
    }
};

// Weights scaled by d only, Q8_0 activations. Unrolled by 4 to thin the loop overhead.
template <class K, int R>
void rows_x_q8_0(int64_t n, const uint8_t* w, size_t stride, const void* a, float* out) {
    using Block = typename K::Block;
    const auto* y = static_cast<const BlockQ8_0*>(a);
    const Block* x[R];
    __m256 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) {
        x[r] = reinterpret_cast<const Block*>(w + static_cast<size_t>(r) * stride);
        acc0[r] = acc1[r] = _mm256_setzero_ps();
    }
    auto step = [&](int64_t i, __m256* acc) {
        const __m256i qy = loadu256(y[i].qs);
        const __m256i c = K::corr(qy);
        const float dy = hs(y[i].d);
        for (int r = 0; r < R; ++r) {
            const __m256i p = K::dot(x[r][i], qy, c);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(hs(x[r][i].d) * dy), _mm256_cvtepi32_ps(p), acc[r]);
        }
    };
    const int64_t nb = n / QK;
    int64_t i = 0;
    for (; i + 3 < nb; i += 4) {
        step(i, acc0);
        step(i + 1, acc1);
        step(i + 2, acc0);
        step(i + 3, acc1);
    }
    for (; i < nb; ++i) step(i, acc0);
    for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}

// Weights d*q + m, Q8_1 activations: per block d*dy*sum(q qy) + m*sy. The m*sy terms are summed
// as scalars in two chains like the vector accumulators (unrolled by 2: measured faster than 4).
template <class K, int R>
void rows_x_q8_1(int64_t n, const uint8_t* w, size_t stride, const void* a, float* out) {
    using Block = typename K::Block;
    const auto* y = static_cast<const BlockQ8_1*>(a);
    const Block* x[R];
    __m256 acc0[R], acc1[R];
    float m0[R], m1[R];
    for (int r = 0; r < R; ++r) {
        x[r] = reinterpret_cast<const Block*>(w + static_cast<size_t>(r) * stride);
        acc0[r] = acc1[r] = _mm256_setzero_ps();
        m0[r] = m1[r] = 0.0f;
    }
    auto step = [&](int64_t i, __m256* acc, float* m) {
        const __m256i qy = loadu256(y[i].qs);
        const float dy = hs(y[i].d), sy = hs(y[i].s);
        for (int r = 0; r < R; ++r) {
            const __m256i p = K::dot(x[r][i], qy);
            m[r] = std::fma(hs(x[r][i].m), sy, m[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(hs(x[r][i].d) * dy), _mm256_cvtepi32_ps(p), acc[r]);
        }
    };
    const int64_t nb = n / QK;
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        step(i, acc0, m0);
        step(i + 1, acc1, m1);
    }
    if (i < nb) step(i, acc0, m0);
    for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + (m0[r] + m1[r]);
}

template <void (*Rows)(int64_t, const uint8_t*, size_t, const void*, float*)>
float one_row(int64_t n, const void* w, const void* a) {
    float r;
    Rows(n, static_cast<const uint8_t*>(w), 0, a, &r);
    return r;
}

float vd_q8_0_avx2(int64_t n, const void* w, const void* a) { return one_row<rows_x_q8_0<IdotQ8_0, 1>>(n, w, a); }
float vd_q4_0_avx2(int64_t n, const void* w, const void* a) { return one_row<rows_x_q8_0<IdotQ4_0, 1>>(n, w, a); }
float vd_q5_0_avx2(int64_t n, const void* w, const void* a) { return one_row<rows_x_q8_0<IdotQ5_0, 1>>(n, w, a); }
float vd_q4_1_avx2(int64_t n, const void* w, const void* a) { return one_row<rows_x_q8_1<IdotQ4_1, 1>>(n, w, a); }
float vd_q5_1_avx2(int64_t n, const void* w, const void* a) { return one_row<rows_x_q8_1<IdotQ5_1, 1>>(n, w, a); }

// Broadcast 16-bit lane j (0..7) of each 128-bit half: pshufb selectors.
alignas(32) constexpr uint8_t kWordSel[8][32] = {
#define X2L_SEL(j) {2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, \
                    2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1}
    X2L_SEL(0), X2L_SEL(1), X2L_SEL(2), X2L_SEL(3), X2L_SEL(4), X2L_SEL(5), X2L_SEL(6), X2L_SEL(7)
#undef X2L_SEL
};

// Q4_K 12-byte scales -> 16 bytes: 8 scales then 8 mins (same packing as unpack_k4_scales,
// done on 32-bit words: bits 6-7 of the first bytes become bits 4-5 of the last four).
inline __m128i unpack_k4_scales_vec(const uint8_t* s) {
    const uint32_t w0 = load_u32(s), w1 = load_u32(s + 4), w2 = load_u32(s + 8);
    const uint32_t sc_lo = w0 & 0x3f3f3f3fu, mn_lo = w1 & 0x3f3f3f3fu;
    const uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u);
    const uint32_t mn_hi = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u);
    return _mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), static_cast<int>(mn_lo),
                          static_cast<int>(mn_hi));
}

float vd_q4_k_avx2(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const __m256i scm = _mm256_cvtepu8_epi16(unpack_k4_scales_vec(x[i].scales));  // [sc 0-7 | mn 0-7]
        // mins: sum_s mn[s] * (bsums[2s] + bsums[2s+1]); pair sums fit int16 (<= 32*127)
        const __m128i bs = _mm_hadd_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y[i].bsums)),
                                          _mm_loadu_si128(reinterpret_cast<const __m128i*>(y[i].bsums + 8)));
        const __m128i pm = _mm_madd_epi16(_mm256_extracti128_si256(scm, 1), bs);
        accm = _mm_fmadd_ps(_mm_set1_ps(hs(x[i].dmin) * y[i].d), _mm_cvtepi32_ps(pm), accm);

        const __m256i sc = _mm256_permute2x128_si256(scm, scm, 0x00);  // scales in both halves
        __m256i sumi = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
            const __m256i q = loadu256(x[i].qs + 32 * c);
            const __m256i lo = _mm256_and_si256(q, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            // nibble x int8: int16 pairs <= 2*15*127, no saturation
            __m256i plo = _mm256_maddubs_epi16(lo, loadu256(y[i].qs + 64 * c));
            __m256i phi = _mm256_maddubs_epi16(hi, loadu256(y[i].qs + 64 * c + 32));
            plo = _mm256_madd_epi16(plo, _mm256_shuffle_epi8(sc, loadu256(kWordSel[2 * c])));
            phi = _mm256_madd_epi16(phi, _mm256_shuffle_epi8(sc, loadu256(kWordSel[2 * c + 1])));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(hs(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    __m128 m = _mm_add_ps(accm, _mm_movehl_ps(accm, accm));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return hsum(acc) - _mm_cvtss_f32(m);
}

// Q6_K: values kept unsigned (0..63) for maddubs; the -32 offset is applied once per block
// through the activation group sums: sum(sc (q-32) qy) = sum(sc q qy) - 32 sum(sc bsum).
float vd_q6_k_avx2(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ6_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i m2 = _mm256_set1_epi8(0x30);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        __m256i sumi = _mm256_slli_epi32(_mm256_madd_epi16(sc16, loadu256(y[i].bsums)), 5);
        sumi = _mm256_sub_epi32(_mm256_setzero_si256(), sumi);
        // scale selector for 32-value group k: bytes [2k x8, 2k+1 x8]
        __m128i sel = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m128i two = _mm_set1_epi8(2);
        for (int h = 0; h < 2; ++h) {
            const __m256i ql0 = loadu256(x[i].ql + 64 * h);
            const __m256i ql1 = loadu256(x[i].ql + 64 * h + 32);
            const __m256i qh = loadu256(x[i].qh + 32 * h);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
            q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m2));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
            for (int k = 0; k < 4; ++k) {
                const __m256i p = _mm256_maddubs_epi16(q[k], loadu256(y[i].qs + 128 * h + 32 * k));
                const __m256i s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, sel));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                sel = _mm_add_epi8(sel, two);
            }
        }
        const float d = hs(x[i].d) * y[i].d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum(acc);
}

float dot_f32_avx2(const float* a, const float* b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

inline __m256 load8_bf16(const uint16_t* p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

#if defined(__F16C__)
inline __m256 load8_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#else
inline __m256 load8_f16(const uint16_t* p) {
    alignas(32) float t[8];
    for (int j = 0; j < 8; ++j) t[j] = h2f(p[j]);
    return _mm256_load_ps(t);
}
#endif

template <__m256 (*Load)(const uint16_t*), float (*Conv)(uint16_t)>
float dot_h_f32_avx2(const uint16_t* a, const float* b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(Load(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(Load(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(Load(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(Load(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(Load(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; ++i) s += Conv(a[i]) * b[i];
    return s;
}

float vd_f32_simd(int64_t n, const void* w, const void* a) {
    return dot_f32_avx2(static_cast<const float*>(w), static_cast<const float*>(a), n);
}
float vd_f16_simd(int64_t n, const void* w, const void* a) {
    return dot_h_f32_avx2<load8_f16, h2f>(static_cast<const uint16_t*>(w), static_cast<const float*>(a), n);
}
float vd_bf16_simd(int64_t n, const void* w, const void* a) {
    return dot_h_f32_avx2<load8_bf16, bf2f>(static_cast<const uint16_t*>(w), static_cast<const float*>(a), n);
}

// Activation quantizers: same arithmetic as the scalar reference, so bit-identical to it.

// roundf (half away from zero) of integral-range floats: trunc, then step away on |frac| >= .5.
inline __m256 round_half_away(__m256 v) {
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0f));
    const __m256 frac = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(v, t));
    const __m256 step = _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ),
                                      _mm256_or_ps(sign, _mm256_set1_ps(1.0f)));
    return _mm256_add_ps(t, step);
}

// One 32-value block -> 32 int8 (in order) + d; returns sum(q).
inline int quant_block_q8_avx2(const float* x, int8_t* qs, float* d_out) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[k], absmask));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i q[4];
    for (int k = 0; k < 4; ++k) q[k] = _mm256_cvttps_epi32(round_half_away(_mm256_mul_ps(v[k], vid)));
    // sum before packing (int32 lanes)
    const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    // pack 32 x i32 -> 32 x i8; packs interleave 128-bit lanes, the permute restores order
    const __m256i p16a = _mm256_packs_epi32(q[0], q[1]);
    const __m256i p16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), ordered);
    *d_out = d;
    return sum;
}

void quant_q8_0_simd(const float* x, BlockQ8_0* b, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float d;
        quant_block_q8_avx2(x, b[i].qs, &d);
        b[i].d = f2h(d);
    }
}

void quant_q8_1_simd(const float* x, BlockQ8_1* b, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float d;
        int sum = quant_block_q8_avx2(x, b[i].qs, &d);
        b[i].d = f2h(d);
        b[i].s = f2h(static_cast<float>(sum) * d);
    }
}

#endif  // X2L_AVX2

// ------------------------------------------------------------------------------ 4c. NEON
#if defined(X2L_NEON)

// int8x16 . int8x16 accumulated into 4 x i32 lanes.
inline int32x4_t dot_s8x16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    const int16x8_t hi = vmull_high_s8(a, b);
    return vpadalq_s16(vpadalq_s16(acc, lo), hi);
#endif
}

// 32 values of a block as two int8x16: values 0-15, 16-31.
struct Q32 {
    int8x16_t lo, hi;
};

inline Q32 nibbles_neon(const uint8_t* qs) {
    const uint8x16_t v = vld1q_u8(qs);
    return {vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), vreinterpretq_s8_u8(vshrq_n_u8(v, 4))};
}

// Bits 0-15 / 16-31 of qh -> 16 bytes each, 0x10 where the bit is set.
inline Q32 high_bits_neon(uint32_t qh) {
    static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t bit = vld1q_u8(kBit);
    const uint8x8_t b0 = vdup_n_u8(static_cast<uint8_t>(qh)), b1 = vdup_n_u8(static_cast<uint8_t>(qh >> 8));
    const uint8x8_t b2 = vdup_n_u8(static_cast<uint8_t>(qh >> 16)), b3 = vdup_n_u8(static_cast<uint8_t>(qh >> 24));
    const uint8x16_t lo = vtstq_u8(vcombine_u8(b0, b1), bit);
    const uint8x16_t hi = vtstq_u8(vcombine_u8(b2, b3), bit);
    const uint8x16_t m = vdupq_n_u8(0x10);
    return {vreinterpretq_s8_u8(vandq_u8(lo, m)), vreinterpretq_s8_u8(vandq_u8(hi, m))};
}

inline int dot32(const Q32& q, const int8_t* y) {
    int32x4_t acc = dot_s8x16(vdupq_n_s32(0), q.lo, vld1q_s8(y));
    acc = dot_s8x16(acc, q.hi, vld1q_s8(y + 16));
    return vaddvq_s32(acc);
}

float vd_q8_0_neon(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ8_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    const int64_t nb = n / QK;
    int64_t i = 0;
    auto blk = [&](int64_t k, float32x4_t acc) {
        int32x4_t s = dot_s8x16(vdupq_n_s32(0), vld1q_s8(x[k].qs), vld1q_s8(y[k].qs));
        s = dot_s8x16(s, vld1q_s8(x[k].qs + 16), vld1q_s8(y[k].qs + 16));
        return vfmaq_n_f32(acc, vcvtq_f32_s32(s), h2f(x[k].d) * h2f(y[k].d));
    };
    for (; i + 1 < nb; i += 2) {
        acc0 = blk(i, acc0);
        acc1 = blk(i + 1, acc1);
    }
    if (i < nb) acc0 = blk(i, acc0);
    return vaddvq_f32(vaddq_f32(acc0, acc1));
}

float vd_q4_0_neon(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float32x4_t acc = vdupq_n_f32(0.0f);
    const int8x16_t eight = vdupq_n_s8(8);
    for (int64_t i = 0; i < n / QK; ++i) {
        Q32 q = nibbles_neon(x[i].qs);
        q.lo = vsubq_s8(q.lo, eight);
        q.hi = vsubq_s8(q.hi, eight);
        int32x4_t s = dot_s8x16(vdupq_n_s32(0), q.lo, vld1q_s8(y[i].qs));
        s = dot_s8x16(s, q.hi, vld1q_s8(y[i].qs + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(s), h2f(x[i].d) * h2f(y[i].d));
    }
    return vaddvq_f32(acc);
}

float vd_q5_0_neon(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_0*>(w);
    const auto* y = static_cast<const BlockQ8_0*>(a);
    float32x4_t acc = vdupq_n_f32(0.0f);
    const int8x16_t sixteen = vdupq_n_s8(16);
    for (int64_t i = 0; i < n / QK; ++i) {
        Q32 q = nibbles_neon(x[i].qs);
        const Q32 hb = high_bits_neon(load_u32(x[i].qh));
        q.lo = vsubq_s8(vorrq_s8(q.lo, hb.lo), sixteen);
        q.hi = vsubq_s8(vorrq_s8(q.hi, hb.hi), sixteen);
        int32x4_t s = dot_s8x16(vdupq_n_s32(0), q.lo, vld1q_s8(y[i].qs));
        s = dot_s8x16(s, q.hi, vld1q_s8(y[i].qs + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(s), h2f(x[i].d) * h2f(y[i].d));
    }
    return vaddvq_f32(acc);
}

float vd_q4_1_neon(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_1*>(w);
    const auto* y = static_cast<const BlockQ8_1*>(a);
    float32x4_t acc = vdupq_n_f32(0.0f);
    float summ = 0.0f;
    for (int64_t i = 0; i < n / QK; ++i) {
        const Q32 q = nibbles_neon(x[i].qs);  // 0..15 fits int8
        int32x4_t s = dot_s8x16(vdupq_n_s32(0), q.lo, vld1q_s8(y[i].qs));
        s = dot_s8x16(s, q.hi, vld1q_s8(y[i].qs + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(s), h2f(x[i].d) * h2f(y[i].d));
        summ += h2f(x[i].m) * h2f(y[i].s);
    }
    return vaddvq_f32(acc) + summ;
}

float vd_q5_1_neon(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ5_1*>(w);
    const auto* y = static_cast<const BlockQ8_1*>(a);
    float32x4_t acc = vdupq_n_f32(0.0f);
    float summ = 0.0f;
    for (int64_t i = 0; i < n / QK; ++i) {
        Q32 q = nibbles_neon(x[i].qs);
        const Q32 hb = high_bits_neon(load_u32(x[i].qh));
        q.lo = vorrq_s8(q.lo, hb.lo);
        q.hi = vorrq_s8(q.hi, hb.hi);
        int32x4_t s = dot_s8x16(vdupq_n_s32(0), q.lo, vld1q_s8(y[i].qs));
        s = dot_s8x16(s, q.hi, vld1q_s8(y[i].qs + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(s), h2f(x[i].d) * h2f(y[i].d));
        summ += h2f(x[i].m) * h2f(y[i].s);
    }
    return vaddvq_f32(acc) + summ;
}

float vd_q4_k_neon(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ4_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    uint8_t sc[8], mn[8];
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        unpack_k4_scales(x[i].scales, sc, mn);
        // mins: pairwise-add bsums to 8 sub-block sums, multiply by the 8 mins
        const int16x8_t b0 = vld1q_s16(y[i].bsums), b1 = vld1q_s16(y[i].bsums + 8);
        const int16x8_t bs = vpaddq_s16(b0, b1);
        const int16x8_t mv = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mn)));
        int32x4_t mm = vmull_s16(vget_low_s16(bs), vget_low_s16(mv));
        mm = vmlal_s16(mm, vget_high_s16(bs), vget_high_s16(mv));
        const int summ = vaddvq_s32(mm);
        int sumi = 0;
        const uint8x16_t m4 = vdupq_n_u8(0x0f);
        for (int c = 0; c < 4; ++c) {
            const uint8x16_t q0 = vld1q_u8(x[i].qs + 32 * c), q1 = vld1q_u8(x[i].qs + 32 * c + 16);
            const int8_t* yc = y[i].qs + 64 * c;
            int32x4_t lo = dot_s8x16(vdupq_n_s32(0), vreinterpretq_s8_u8(vandq_u8(q0, m4)), vld1q_s8(yc));
            lo = dot_s8x16(lo, vreinterpretq_s8_u8(vandq_u8(q1, m4)), vld1q_s8(yc + 16));
            int32x4_t hi = dot_s8x16(vdupq_n_s32(0), vreinterpretq_s8_u8(vshrq_n_u8(q0, 4)), vld1q_s8(yc + 32));
            hi = dot_s8x16(hi, vreinterpretq_s8_u8(vshrq_n_u8(q1, 4)), vld1q_s8(yc + 48));
            sumi += vaddvq_s32(lo) * sc[2 * c] + vaddvq_s32(hi) * sc[2 * c + 1];
        }
        acc += y[i].d * (h2f(x[i].d) * static_cast<float>(sumi) - h2f(x[i].dmin) * static_cast<float>(summ));
    }
    return acc;
}

float vd_q6_k_neon(int64_t n, const void* w, const void* a) {
    const auto* x = static_cast<const BlockQ6_K*>(w);
    const auto* y = static_cast<const BlockQ8_K*>(a);
    float acc = 0.0f;
    const uint8x16_t m4 = vdupq_n_u8(0x0f), m3 = vdupq_n_u8(0x30);
    const int8x16_t off = vdupq_n_s8(32);
    for (int64_t i = 0; i < n / QK_K; ++i) {
        int32x4_t sumv = vdupq_n_s32(0);
        for (int h = 0; h < 2; ++h) {
            const uint8_t* ql = x[i].ql + 64 * h;
            const uint8_t* qh = x[i].qh + 32 * h;
            const int8_t* sc = x[i].scales + 8 * h;
            const int8_t* yh = y[i].qs + 128 * h;
            for (int l = 0; l < 32; l += 16) {  // l: which 16 of the 32 values of each group k
                const uint8x16_t a0 = vld1q_u8(ql + l), a1 = vld1q_u8(ql + 32 + l), hb = vld1q_u8(qh + l);
                int8x16_t q[4];
                q[0] = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(a0, m4), vandq_u8(vshlq_n_u8(hb, 4), m3)));
                q[1] = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(a1, m4), vandq_u8(vshlq_n_u8(hb, 2), m3)));
                q[2] = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(a0, 4), vandq_u8(hb, m3)));
                q[3] = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(a1, 4), vandq_u8(vshrq_n_u8(hb, 2), m3)));
                for (int k = 0; k < 4; ++k) {
                    const int32x4_t d = dot_s8x16(vdupq_n_s32(0), vsubq_s8(q[k], off), vld1q_s8(yh + 32 * k + l));
                    sumv = vmlaq_n_s32(sumv, d, sc[2 * k + l / 16]);
                }
            }
        }
        acc += (h2f(x[i].d) * y[i].d) * static_cast<float>(vaddvq_s32(sumv));
    }
    return acc;
}

float dot_f32_neon(const float* a, const float* b, int64_t n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

inline float32x4_t load4_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
inline float32x4_t load4_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }

template <float32x4_t (*Load)(const uint16_t*), float (*Conv)(uint16_t)>
float dot_h_f32_neon(const uint16_t* a, const float* b, int64_t n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, Load(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, Load(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, Load(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, Load(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, Load(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; ++i) s += Conv(a[i]) * b[i];
    return s;
}

float vd_f32_simd(int64_t n, const void* w, const void* a) {
    return dot_f32_neon(static_cast<const float*>(w), static_cast<const float*>(a), n);
}
float vd_f16_simd(int64_t n, const void* w, const void* a) {
    return dot_h_f32_neon<load4_f16, h2f>(static_cast<const uint16_t*>(w), static_cast<const float*>(a), n);
}
float vd_bf16_simd(int64_t n, const void* w, const void* a) {
    return dot_h_f32_neon<load4_bf16, bf2f>(static_cast<const uint16_t*>(w), static_cast<const float*>(a), n);
}

#endif  // X2L_NEON

// ------------------------------------------------------------------------------ dispatch
using VecDotFn = float (*)(int64_t, const void*, const void*);

struct DotKernels {
    VecDotFn ref;
    VecDotFn simd;
};

#if defined(X2L_AVX2)
#define X2L_SIMD_KERNEL(name) vd_##name##_avx2
#define X2L_SIMD_FLOAT(name) vd_##name##_simd
#elif defined(X2L_NEON)
#define X2L_SIMD_KERNEL(name) vd_##name##_neon
#define X2L_SIMD_FLOAT(name) vd_##name##_simd
#else
#define X2L_SIMD_KERNEL(name) vd_##name##_ref
#define X2L_SIMD_FLOAT(name) vd_##name##_ref
#endif

const DotKernels* dot_kernels(DType w) {
    static const DotKernels f32{vd_f32_ref, X2L_SIMD_FLOAT(f32)};
    static const DotKernels f16{vd_f16_ref, X2L_SIMD_FLOAT(f16)};
    static const DotKernels bf16{vd_bf16_ref, X2L_SIMD_FLOAT(bf16)};
    static const DotKernels q4_0{vd_q4_0_ref, X2L_SIMD_KERNEL(q4_0)};
    static const DotKernels q4_1{vd_q4_1_ref, X2L_SIMD_KERNEL(q4_1)};
    static const DotKernels q5_0{vd_q5_0_ref, X2L_SIMD_KERNEL(q5_0)};
    static const DotKernels q5_1{vd_q5_1_ref, X2L_SIMD_KERNEL(q5_1)};
    static const DotKernels q8_0{vd_q8_0_ref, X2L_SIMD_KERNEL(q8_0)};
    static const DotKernels q4_k{vd_q4_k_ref, X2L_SIMD_KERNEL(q4_k)};
    static const DotKernels q6_k{vd_q6_k_ref, X2L_SIMD_KERNEL(q6_k)};
    switch (w) {
        case DType::F32: return &f32;
        case DType::F16: return &f16;
        case DType::BF16: return &bf16;
        case DType::Q4_0: return &q4_0;
        case DType::Q4_1: return &q4_1;
        case DType::Q5_0: return &q5_0;
        case DType::Q5_1: return &q5_1;
        case DType::Q8_0: return &q8_0;
        case DType::Q4_K: return &q4_k;
        case DType::Q6_K: return &q6_k;
        default: return nullptr;
    }
}

// Kernels computing 4 rows at once (bit-identical per row to the single-row SIMD kernel).
using Rows4Fn = void (*)(int64_t, const uint8_t*, size_t, const void*, float*);
Rows4Fn rows4_kernel(DType w) {
#if defined(X2L_AVX2)
    switch (w) {
        case DType::Q8_0: return rows_x_q8_0<IdotQ8_0, 4>;
        case DType::Q4_0: return rows_x_q8_0<IdotQ4_0, 4>;
        case DType::Q5_0: return rows_x_q8_0<IdotQ5_0, 4>;
        case DType::Q4_1: return rows_x_q8_1<IdotQ4_1, 4>;
        case DType::Q5_1: return rows_x_q8_1<IdotQ5_1, 4>;
        default: return nullptr;
    }
#else
    (void)w;
    return nullptr;
#endif
}

}  // namespace

// ================================================================================= public API

void set_force_scalar(bool on) { g_force_scalar.store(on, std::memory_order_relaxed); }

void dequantize_row(DType t, const void* src, float* dst, int64_t n) {
    const int64_t nb32 = n / QK, nbk = n / QK_K;
    switch (t) {
        case DType::F32: std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); return;
        case DType::F16: fp16_to_fp32_row(static_cast<const uint16_t*>(src), dst, n); return;
        case DType::BF16: {
            const auto* s = static_cast<const uint16_t*>(src);
            for (int64_t i = 0; i < n; ++i) dst[i] = bf2f(s[i]);
            return;
        }
        case DType::Q4_0: dequant_q4_0(static_cast<const BlockQ4_0*>(src), dst, nb32); return;
        case DType::Q4_1: dequant_q4_1(static_cast<const BlockQ4_1*>(src), dst, nb32); return;
        case DType::Q5_0: dequant_q5_0(static_cast<const BlockQ5_0*>(src), dst, nb32); return;
        case DType::Q5_1: dequant_q5_1(static_cast<const BlockQ5_1*>(src), dst, nb32); return;
        case DType::Q8_0: dequant_q8_0(static_cast<const BlockQ8_0*>(src), dst, nb32); return;
        case DType::Q8_1: dequant_q8_1(static_cast<const BlockQ8_1*>(src), dst, nb32); return;
        case DType::Q4_K: dequant_q4_k(static_cast<const BlockQ4_K*>(src), dst, nbk); return;
        case DType::Q6_K: dequant_q6_k(static_cast<const BlockQ6_K*>(src), dst, nbk); return;
        case DType::Q8_K: dequant_q8_k(static_cast<const BlockQ8_K*>(src), dst, nbk); return;
        default: unsupported("dequantize_row", t);
    }
}

void quantize_row(DType t, const float* src, void* dst, int64_t n) {
    const int64_t nb32 = n / QK, nbk = n / QK_K;
    switch (t) {
        case DType::F32: std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); return;
        case DType::F16: fp32_to_fp16_row(src, static_cast<uint16_t*>(dst), n); return;
        case DType::BF16: {
            auto* d = static_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < n; ++i) d[i] = f2bf(src[i]);
            return;
        }
        case DType::Q4_0: quant_q4_0(src, static_cast<BlockQ4_0*>(dst), nb32); return;
        case DType::Q4_1: quant_q4_1(src, static_cast<BlockQ4_1*>(dst), nb32); return;
        case DType::Q5_0: quant_q5_0(src, static_cast<BlockQ5_0*>(dst), nb32); return;
        case DType::Q5_1: quant_q5_1(src, static_cast<BlockQ5_1*>(dst), nb32); return;
        case DType::Q8_0:
#if defined(X2L_AVX2)
            if (use_simd()) return quant_q8_0_simd(src, static_cast<BlockQ8_0*>(dst), nb32);
#endif
            quant_q8_0_ref(src, static_cast<BlockQ8_0*>(dst), nb32);
            return;
        case DType::Q8_1:
#if defined(X2L_AVX2)
            if (use_simd()) return quant_q8_1_simd(src, static_cast<BlockQ8_1*>(dst), nb32);
#endif
            quant_q8_1_ref(src, static_cast<BlockQ8_1*>(dst), nb32);
            return;
        case DType::Q8_K: quant_q8_k_ref(src, static_cast<BlockQ8_K*>(dst), nbk); return;
        default: unsupported("quantize_row", t);
    }
}

DType dot_type(DType w) {
    switch (w) {
        case DType::F32:
        case DType::F16:
        case DType::BF16: return DType::F32;
        case DType::Q4_0:
        case DType::Q5_0:
        case DType::Q8_0: return DType::Q8_0;
        case DType::Q4_1:
        case DType::Q5_1: return DType::Q8_1;
        case DType::Q4_K:
        case DType::Q6_K: return DType::Q8_K;
        default: unsupported("dot_type", w);
    }
}

float vec_dot(DType w, int64_t n, const void* w_row, const void* act_row) {
    const DotKernels* k = dot_kernels(w);
    if (!k) unsupported("vec_dot", w);
    return (use_simd() ? k->simd : k->ref)(n, w_row, act_row);
}

void vec_dot_rows(DType w, int64_t n, const void* w_rows, size_t w_stride, int64_t n_rows, const void* act_row,
                  float* out) {
    const DotKernels* k = dot_kernels(w);
    if (!k) unsupported("vec_dot_rows", w);
    const auto* base = static_cast<const uint8_t*>(w_rows);
    const bool simd = use_simd();
    int64_t r = 0;
    if (Rows4Fn fn4 = simd ? rows4_kernel(w) : nullptr) {
        for (; r + 4 <= n_rows; r += 4) fn4(n, base + static_cast<size_t>(r) * w_stride, w_stride, act_row, out + r);
    }
    const VecDotFn one = simd ? k->simd : k->ref;
    for (; r < n_rows; ++r) out[r] = one(n, base + static_cast<size_t>(r) * w_stride, act_row);
}

float fp16_to_fp32(uint16_t h) { return h2f(h); }
uint16_t fp32_to_fp16(float f) { return f2h(f); }
float bf16_to_fp32(uint16_t h) { return bf2f(h); }
uint16_t fp32_to_bf16(float f) { return f2bf(f); }

float fp16_to_fp32_sw(uint16_t h) { return half_to_float_sw(h); }
uint16_t fp32_to_fp16_sw(float f) { return float_to_half_sw(f); }

void fp16_to_fp32_row(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
#if defined(X2L_AVX2) && defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8_f16(src + i));
#elif defined(X2L_NEON)
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, load4_f16(src + i));
#endif
    for (; i < n; ++i) dst[i] = h2f(src[i]);
}

void fp32_to_fp16_row(const float* src, uint16_t* dst, int64_t n) {
    int64_t i = 0;
#if defined(X2L_AVX2) && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(X2L_NEON)
    for (; i + 4 <= n; i += 4) vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
#endif
    for (; i < n; ++i) dst[i] = f2h(src[i]);
}

float dot_f32(const float* a, const float* b, int64_t n) {
#if defined(X2L_AVX2)
    if (use_simd()) return dot_f32_avx2(a, b, n);
#elif defined(X2L_NEON)
    if (use_simd()) return dot_f32_neon(a, b, n);
#endif
    return dot_f32_ref(a, b, n);
}

float dot_f16_f32(const uint16_t* a, const float* b, int64_t n) {
#if defined(X2L_AVX2)
    if (use_simd()) return dot_h_f32_avx2<load8_f16, h2f>(a, b, n);
#elif defined(X2L_NEON)
    if (use_simd()) return dot_h_f32_neon<load4_f16, h2f>(a, b, n);
#endif
    return dot_f16_ref(a, b, n);
}

void axpy_f32(float a, const float* x, float* y, int64_t n) {
    int64_t i = 0;
#if defined(X2L_AVX2)
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
        _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8)));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#elif defined(X2L_NEON)
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
#endif
    for (; i < n; ++i) y[i] += a * x[i];
}

void axpy_f16(float a, const uint16_t* x, float* y, int64_t n) {
    int64_t i = 0;
#if defined(X2L_AVX2)
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8_f16(x + i), _mm256_loadu_ps(y + i)));
#elif defined(X2L_NEON)
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), load4_f16(x + i), a));
#endif
    for (; i < n; ++i) y[i] += a * h2f(x[i]);
}

}  // namespace x2l
