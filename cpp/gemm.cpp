// Register-tiled matmul kernels (see gemm.h for the arithmetic every path reproduces).
//
// Layout of this file:
//   1. activation packing (GemmActs) and the block formats
//   2. the portable scalar reference
//   3. AVX2 (+FMA, F16C; VNNI when compiled for it) kernels:
//        quantized weights: rows are repacked 8 at a time so that one vector holds 4 values of
//        each of 8 rows; a broadcast of 4 activation bytes then feeds one dot instruction that
//        advances 8 outputs, and each output owns one vector lane (its per-block scale is a lane
//        of a vector multiply). Tiles of 16 rows x N tokens reuse every weight load N times and
//        every activation broadcast twice. Few tokens skip the repack: 8 rows are dotted in their
//        own layout and the 8 x 8 partial sums are folded into the same lanes with hadd.
//        float weights: tiles of RM rows x RN tokens, one 8-lane accumulator per output.
//   4. dispatch
#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define X2L_GEMM_AVX2 1
#include <immintrin.h>
#endif

namespace x2l {

namespace {

constexpr int QK = 32;     // values per block of the legacy formats
constexpr int QK_K = 256;  // values per K-quant super-block

inline size_t align64(size_t n) { return (n + 63) & ~static_cast<size_t>(63); }

inline uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}
inline uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// ------------------------------------------------------------------------------ 1. formats
// Byte layouts (ggml): Q4_0 {d, qs[16]}, Q4_1 {d, m, qs[16]}, Q5_0 {d, qh[4], qs[16]},
// Q5_1 {d, m, qh[4], qs[16]}, Q8_0 {d, qs[32]}, Q8_1 {d, s, qs[32]}; d, m, s are fp16.
struct Block32Info {
    size_t bytes;
    bool asym;  // value = d * q + m (else d * q)
};

bool block32_info(DType t, Block32Info* out) {
    switch (t) {
        case DType::Q4_0: *out = {18, false}; return true;
        case DType::Q4_1: *out = {20, true}; return true;
        case DType::Q5_0: *out = {22, false}; return true;
        case DType::Q5_1: *out = {24, true}; return true;
        case DType::Q8_0: *out = {34, false}; return true;
        default: return false;
    }
}

// The integer values of one weight block (what d multiplies), scale and min.
void block32_values(DType t, const uint8_t* b, int q[QK], float* d, float* m) {
    *d = fp16_to_fp32(load_u16(b));
    *m = 0.0f;
    switch (t) {
        case DType::Q4_0:
            for (int j = 0; j < 16; ++j) {
                q[j] = (b[2 + j] & 0x0f) - 8;
                q[j + 16] = (b[2 + j] >> 4) - 8;
            }
            return;
        case DType::Q4_1:
            *m = fp16_to_fp32(load_u16(b + 2));
            for (int j = 0; j < 16; ++j) {
                q[j] = b[4 + j] & 0x0f;
                q[j + 16] = b[4 + j] >> 4;
            }
            return;
        case DType::Q5_0:
        case DType::Q5_1: {
            const bool asym = t == DType::Q5_1;
            if (asym) *m = fp16_to_fp32(load_u16(b + 2));
            const uint32_t qh = load_u32(b + (asym ? 4 : 2));
            const uint8_t* qs = b + (asym ? 8 : 6);
            const int off = asym ? 0 : 16;
            for (int j = 0; j < 16; ++j) {
                q[j] = ((qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4)) - off;
                q[j + 16] = ((qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4)) - off;
            }
            return;
        }
        case DType::Q8_0:
            for (int j = 0; j < QK; ++j) q[j] = static_cast<int8_t>(b[2 + j]);
            return;
        default: throw Error("gemm: not a 32-value block type");
    }
}

// Q4_K / Q5_K 6-bit scales and mins, 8 of each packed in 12 bytes (ggml get_scale_min_k4).
void unpack_k4_scales(const uint8_t* s, int sc[8], int mn[8]) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

// Q4_K block {d, dmin, scales[12], qs[128]}: value 64c + l (l < 32) is the low nibble of
// qs[32c + l], value 64c + 32 + l its high nibble; sub-block s = value / 32.
constexpr size_t kQ4KBytes = 144;
// Q6_K block {ql[128], qh[64], scales[16] (int8), d}: see q6k_values.
constexpr size_t kQ6KBytes = 210;

void q6k_values(const uint8_t* b, int q[QK_K]) {
    for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = b + 64 * h;
        const uint8_t* qh = b + 128 + 32 * h;
        int* o = q + 128 * h;
        for (int l = 0; l < 32; ++l) {
            o[l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
            o[l + 32] = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
            o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        }
    }
}

bool is_float_weight(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

float float_weight(DType t, const uint8_t* row, int64_t k) {
    if (t == DType::F32) {
        float v;
        std::memcpy(&v, row + 4 * k, 4);
        return v;
    }
    const uint16_t h = load_u16(row + 2 * k);
    return t == DType::F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
}

// ------------------------------------------------------------------------------ 2. reference
float ref_block32(DType wt, const uint8_t* wrow, const GemmActs& a, int64_t t, bool asym) {
    const int64_t nb = a.n_in / QK;
    Block32Info bi{0, false};
    block32_info(wt, &bi);
    float acc = 0.0f;
    int q[QK];
    for (int64_t b = 0; b < nb; ++b) {
        float d, m;
        block32_values(wt, wrow + b * bi.bytes, q, &d, &m);
        const int8_t* y = a.qs + (t * nb + b) * QK;
        int isum = 0;
        for (int j = 0; j < QK; ++j) isum += q[j] * y[j];
        acc = std::fma(static_cast<float>(isum), d * a.d[t * nb + b], acc);
        if (asym) acc = std::fma(m, a.s[t * nb + b], acc);
    }
    return acc;
}

float ref_q4_k(const uint8_t* wrow, const GemmActs& a, int64_t t) {
    const int64_t nb = a.n_in / QK_K;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* x = wrow + b * kQ4KBytes;
        const int8_t* y = a.qs + (t * nb + b) * QK_K;
        const int16_t* bs = a.bsums + (t * nb + b) * 16;
        int sc[8], mn[8];
        unpack_k4_scales(x + 4, sc, mn);
        int isum = 0, msum = 0;
        for (int s = 0; s < 8; ++s) {
            const int c = s / 2, hi = s % 2;
            int dot = 0;
            for (int l = 0; l < 32; ++l) {
                const uint8_t byte = x[16 + 32 * c + l];
                dot += (hi ? byte >> 4 : byte & 0x0f) * y[32 * s + l];
            }
            isum += sc[s] * dot;
            msum += mn[s] * (bs[2 * s] + bs[2 * s + 1]);
        }
        const float dy = a.d[t * nb + b];
        acc = std::fma(static_cast<float>(isum), fp16_to_fp32(load_u16(x)) * dy, acc);
        acc = std::fma(static_cast<float>(-msum), fp16_to_fp32(load_u16(x + 2)) * dy, acc);
    }
    return acc;
}

float ref_q6_k(const uint8_t* wrow, const GemmActs& a, int64_t t) {
    const int64_t nb = a.n_in / QK_K;
    float acc = 0.0f;
    int q[QK_K];
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* x = wrow + b * kQ6KBytes;
        const int8_t* y = a.qs + (t * nb + b) * QK_K;
        q6k_values(x, q);
        int isum = 0;
        for (int g = 0; g < 16; ++g) {
            int dot = 0;
            for (int l = 0; l < 16; ++l) dot += q[16 * g + l] * y[16 * g + l];
            isum += static_cast<int8_t>(x[192 + g]) * dot;
        }
        acc = std::fma(static_cast<float>(isum), fp16_to_fp32(load_u16(x + 208)) * a.d[t * nb + b], acc);
    }
    return acc;
}

float ref_float(DType wt, const uint8_t* wrow, const float* x, int64_t n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = 0; k < n; ++k) s[k % 8] = std::fma(float_weight(wt, wrow, k), x[k], s[k % 8]);
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

}  // namespace

// ------------------------------------------------------------------------------ 1b. activations
size_t gemm_acts_bytes(DType at, int64_t n_tokens, int64_t n_in) {
    const size_t T = static_cast<size_t>(n_tokens);
    switch (at) {
        case DType::F32: return 0;
        case DType::Q8_0:
        case DType::Q8_1: {
            const size_t nb = static_cast<size_t>(n_in / QK);
            return align64(T * nb * QK) + 3 * align64(T * nb * 4) + 64;
        }
        case DType::Q8_K: {
            const size_t nb = static_cast<size_t>(n_in / QK_K);
            return align64(T * nb * QK_K) + align64(T * nb * 4) + align64(T * nb * 32) + 64;
        }
        default: throw Error("gemm: unsupported activation type");
    }
}

GemmActs gemm_acts(DType at, const float* x, int64_t n_tokens, int64_t n_in, uint8_t* buf) {
    GemmActs a;
    a.type = at;
    a.n_tokens = n_tokens;
    a.n_in = n_in;
    a.x = x;
    if (at == DType::F32) return a;
    uint8_t* p = reinterpret_cast<uint8_t*>(align64(reinterpret_cast<uintptr_t>(buf)));
    const size_t T = static_cast<size_t>(n_tokens);
    const size_t bsz = at == DType::Q8_K ? QK_K : QK;
    const size_t nb = static_cast<size_t>(n_in) / bsz;
    a.qs = reinterpret_cast<const int8_t*>(p);
    p += align64(T * nb * bsz);
    a.d = reinterpret_cast<const float*>(p);
    p += align64(T * nb * 4);
    if (at == DType::Q8_K) {
        a.bsums = reinterpret_cast<const int16_t*>(p);
    } else {
        a.s = reinterpret_cast<const float*>(p);
        p += align64(T * nb * 4);
        a.sum = reinterpret_cast<const int32_t*>(p);
    }
    return a;
}

void gemm_pack_token(const GemmActs& a, int64_t t, const void* qrow) {
    const auto* src = static_cast<const uint8_t*>(qrow);
    if (a.type == DType::Q8_K) {
        // Q8_K block {float d, int8 qs[256], int16 bsums[16]}
        const int64_t nb = a.n_in / QK_K;
        for (int64_t b = 0; b < nb; ++b, src += 292) {
            std::memcpy(const_cast<int8_t*>(a.qs) + (t * nb + b) * QK_K, src + 4, QK_K);
            std::memcpy(const_cast<float*>(a.d) + t * nb + b, src, 4);
            std::memcpy(const_cast<int16_t*>(a.bsums) + (t * nb + b) * 16, src + 4 + QK_K, 32);
        }
        return;
    }
    const bool q81 = a.type == DType::Q8_1;
    const size_t bytes = q81 ? 36 : 34, qoff = q81 ? 4 : 2;
    const int64_t nb = a.n_in / QK;
    auto* qs = const_cast<int8_t*>(a.qs) + t * nb * QK;
    auto* d = const_cast<float*>(a.d) + t * nb;
    auto* s = const_cast<float*>(a.s) + t * nb;
    auto* sum = const_cast<int32_t*>(a.sum) + t * nb;
    for (int64_t b = 0; b < nb; ++b, src += bytes) {
        std::memcpy(qs + b * QK, src + qoff, QK);
        d[b] = fp16_to_fp32(load_u16(src));
        s[b] = q81 ? fp16_to_fp32(load_u16(src + 2)) : 0.0f;
        int acc = 0;
        for (int j = 0; j < QK; ++j) acc += qs[b * QK + j];
        sum[b] = acc;
    }
}

void gemm_reference(DType wt, const uint8_t* w, size_t w_stride, int64_t r0, int64_t r1, const GemmActs& a,
                    float* y, int64_t ldy, const float* bias) {
    if (a.type != dot_type(wt)) throw Error("gemm_reference: activation type does not match the weights");
    Block32Info bi{0, false};
    const bool b32 = block32_info(wt, &bi);
    for (int64_t t = 0; t < a.n_tokens; ++t) {
        for (int64_t r = r0; r < r1; ++r) {
            const uint8_t* row = w + static_cast<size_t>(r) * w_stride;
            float v;
            if (is_float_weight(wt)) {
                v = ref_float(wt, row, a.x + t * a.n_in, a.n_in);
            } else if (b32) {
                v = ref_block32(wt, row, a, t, bi.asym);
            } else if (wt == DType::Q4_K) {
                v = ref_q4_k(row, a, t);
            } else if (wt == DType::Q6_K) {
                v = ref_q6_k(row, a, t);
            } else {
                throw Error("gemm_reference: unsupported weight type");
            }
            y[t * ldy + r] = bias ? v + bias[r] : v;
        }
    }
}

// ------------------------------------------------------------------------------ 3. AVX2
#if defined(X2L_GEMM_AVX2)
namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define X2L_GEMM_VNNI 1
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#elif defined(__AVXVNNI__)
#define X2L_GEMM_VNNI 1
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#endif

// AVX-512VL gives the compiler 32 vector registers for the same 256-bit code: bigger tiles.
#if defined(__AVX512VL__)
constexpr int kRegs = 32;
#else
constexpr int kRegs = 16;
#endif

inline __m256i loadu(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m256i bcast32(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// acc + sum over each 4 bytes of u * s. Unsigned mode: u is 0..255 (VNNI) or 0..31 (maddubs,
// whose int16 pair sums then stay below 2 * 31 * 127). Signed mode (non-VNNI Q8_0): u holds
// signed values and the sign moves onto s, |values| <= 127 keeps maddubs exact.
template <bool Signed>
inline __m256i idot(__m256i acc, __m256i u, __m256i s) {
    if constexpr (Signed) {
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(s, u));
        return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    } else {
#if defined(X2L_GEMM_VNNI)
        return dpbusd(acc, u, s);
#else
        return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
    }
}

// 16 packed bytes -> 32 nibbles in value order (low nibbles = values 0-15, high = 16-31).
inline __m256i nibbles(const uint8_t* qs) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    return _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0f));
}

// The 5th bits of Q5 values: byte j = 16 when bit j of qh is set.
inline __m256i bit5(const uint8_t* qh) {
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
    const __m256i v = _mm256_shuffle_epi8(bcast32(qh), pick);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(16));
}

// Weight formats for the kernels: vals() gives the 32 values of a block as bytes q + kOff
// (kOff makes them unsigned for the u8 x s8 dot; the exact sum is restored by starting the
// integer accumulator at -kOff * sum(activation block)).
struct FQ4_0 {
    static constexpr size_t kBytes = 18;
    static constexpr int kOff = 8;
    static constexpr bool kAsym = false, kSigned = false;
    static __m256i vals(const uint8_t* b) { return nibbles(b + 2); }
};
struct FQ4_1 {
    static constexpr size_t kBytes = 20;
    static constexpr int kOff = 0;
    static constexpr bool kAsym = true, kSigned = false;
    static __m256i vals(const uint8_t* b) { return nibbles(b + 4); }
};
struct FQ5_0 {
    static constexpr size_t kBytes = 22;
    static constexpr int kOff = 16;
    static constexpr bool kAsym = false, kSigned = false;
    static __m256i vals(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 6), bit5(b + 2)); }
};
struct FQ5_1 {
    static constexpr size_t kBytes = 24;
    static constexpr int kOff = 0;
    static constexpr bool kAsym = true, kSigned = false;
    static __m256i vals(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 8), bit5(b + 4)); }
};
struct FQ8_0 {
    static constexpr size_t kBytes = 34;
    static constexpr bool kAsym = false;
#if defined(X2L_GEMM_VNNI)
    // q + 128 = q ^ 0x80 as a byte: dpbusd takes the full 0..255 range exactly.
    static constexpr int kOff = 128;
    static constexpr bool kSigned = false;
    static __m256i vals(const uint8_t* b) { return _mm256_xor_si256(loadu(b + 2), _mm256_set1_epi8(-128)); }
#else
    static constexpr int kOff = 0;
    static constexpr bool kSigned = true;
    static __m256i vals(const uint8_t* b) { return loadu(b + 2); }
#endif
};

// 8 x u16 from the low halves of 8 x u32.
inline __m128i low16(__m256i v) {
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0xffff));
    return _mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
}

// Scales (and mins) of block b of 8 rows: d and m are the first two fp16 of every block, so one
// 32-bit gather at the block starts fetches both.
template <class F>
inline void load_dm(const uint8_t* blocks, __m256i offs, __m256* d, __m256* m) {
    const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int*>(blocks), offs, 1);
    *d = _mm256_cvtph_ps(low16(v));
    if constexpr (F::kAsym) *m = _mm256_cvtph_ps(low16(_mm256_srli_epi32(v, 16)));
}

// Byte offsets of 8 rows (rows past n repeat the last one: their lanes are computed, never stored).
inline __m256i row_offsets(size_t stride, int n) {
    alignas(32) int32_t o[8];
    for (int r = 0; r < 8; ++r) o[r] = static_cast<int32_t>(static_cast<size_t>(std::min(r, n - 1)) * stride);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(o));
}

// out[c] = dword c of each of r[0..7]: an 8 x 8 transpose of 32-bit elements.
inline void transpose8(const __m256i r[8], __m256i out[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h+3
        const __m256i* tt = t + 4 * h;
        u[4 * h + 0] = _mm256_unpacklo_epi64(tt[0], tt[2]);  // dwords 0 | 4
        u[4 * h + 1] = _mm256_unpackhi_epi64(tt[0], tt[2]);  // 1 | 5
        u[4 * h + 2] = _mm256_unpacklo_epi64(tt[1], tt[3]);  // 2 | 6
        u[4 * h + 3] = _mm256_unpackhi_epi64(tt[1], tt[3]);  // 3 | 7
    }
    for (int c = 0; c < 4; ++c) {
        out[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
        out[c + 4] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
}

// Repacked block of 8 rows: 8 chunks x [8 rows x 4 values] of bytes q + kOff, then the 8 row
// scales (float), then the 8 mins for asymmetric formats.
template <class F>
constexpr size_t kPackBlock = 256 + 32 + (F::kAsym ? 32 : 0);

template <class F>
void repack8(const uint8_t* w, size_t stride, int n, int64_t nb, uint8_t* dst) {
    alignas(32) int32_t o[8];
    for (int r = 0; r < 8; ++r) o[r] = static_cast<int32_t>(static_cast<size_t>(std::min(r, n - 1)) * stride);
    const __m256i offs = _mm256_load_si256(reinterpret_cast<const __m256i*>(o));
    for (int64_t b = 0; b < nb; ++b, dst += kPackBlock<F>) {
        const uint8_t* blocks = w + b * F::kBytes;
        __m256i rows[8], cols[8];
        for (int r = 0; r < 8; ++r) rows[r] = F::vals(blocks + o[r]);
        transpose8(rows, cols);
        for (int c = 0; c < 8; ++c) _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 32 * c), cols[c]);
        __m256 d, m;
        load_dm<F>(blocks, offs, &d, &m);
        _mm256_store_ps(reinterpret_cast<float*>(dst + 256), d);
        if constexpr (F::kAsym) _mm256_store_ps(reinterpret_cast<float*>(dst + 288), m);
    }
}

// Stores 8 row lanes (rows row0 .. row0 + n - 1) of token row y.
inline void store_rows(float* y, const float* bias, int n, __m256 v) {
    if (n >= 8) {
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
        _mm256_storeu_ps(y, v);
        return;
    }
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int i = 0; i < n; ++i) y[i] = bias ? tmp[i] + bias[i] : tmp[i];
}

// Per-token activation pointers for block-indexed access.
struct TokenActs {
    const int8_t* qs;
    const float* d;
    const float* s;
    const int32_t* sum;
};
inline TokenActs token_acts(const GemmActs& a, int64_t t, int64_t nb) {
    return {a.qs + t * nb * QK, a.d + t * nb, a.s + t * nb, a.sum + t * nb};
}

template <class F>
inline __m256i int_init(const TokenActs& y, int64_t b) {
    if constexpr (F::kOff == 0) {
        return _mm256_setzero_si256();
    } else {
        return _mm256_set1_epi32(-F::kOff * y.sum[b]);
    }
}

// G groups of 8 repacked rows (gstride bytes apart) x N tokens from t0.
template <class F, int G, int N>
void qtile(const uint8_t* pk, size_t gstride, int64_t nb, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
           int64_t row0, int n_rows, const float* bias) {
    constexpr size_t BS = kPackBlock<F>;
    TokenActs ya[N];
    for (int j = 0; j < N; ++j) ya[j] = token_acts(a, t0 + j, nb);
    __m256 acc[G][N];
    for (int g = 0; g < G; ++g)
        for (int j = 0; j < N; ++j) acc[g][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = pk + b * BS;
        __m256i is[G][N];
        for (int j = 0; j < N; ++j) {
            const __m256i init = int_init<F>(ya[j], b);
            for (int g = 0; g < G; ++g) is[g][j] = init;
        }
        for (int c = 0; c < 8; ++c) {
            __m256i wv[G];
            for (int g = 0; g < G; ++g) wv[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + g * gstride + 32 * c));
            for (int j = 0; j < N; ++j) {
                const __m256i yb = bcast32(ya[j].qs + b * QK + 4 * c);
                for (int g = 0; g < G; ++g) is[g][j] = idot<F::kSigned>(is[g][j], wv[g], yb);
            }
        }
        for (int g = 0; g < G; ++g) {
            const __m256 dv = _mm256_load_ps(reinterpret_cast<const float*>(p + g * gstride + 256));
            for (int j = 0; j < N; ++j) {
                const __m256 sc = _mm256_mul_ps(dv, _mm256_set1_ps(ya[j].d[b]));
                acc[g][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[g][j]), sc, acc[g][j]);
            }
            if constexpr (F::kAsym) {
                const __m256 mv = _mm256_load_ps(reinterpret_cast<const float*>(p + g * gstride + 288));
                for (int j = 0; j < N; ++j) acc[g][j] = _mm256_fmadd_ps(mv, _mm256_set1_ps(ya[j].s[b]), acc[g][j]);
            }
        }
    }
    for (int j = 0; j < N; ++j)
        for (int g = 0; g < G; ++g) {
            const int n = n_rows - 8 * g;
            if (n > 0)
                store_rows(y + (t0 + j) * ldy + row0 + 8 * g, bias ? bias + row0 + 8 * g : nullptr, n, acc[g][j]);
        }
}

// The integer sums of 8 vectors (one per row) in the lanes of one vector.
inline __m256i fold8(__m256i h01, __m256i h23, __m256i h45, __m256i h67) {
    const __m256i g0 = _mm256_hadd_epi32(h01, h23), g1 = _mm256_hadd_epi32(h45, h67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20), _mm256_permute2x128_si256(g0, g1, 0x31));
}

// 8 rows in their own layout x N tokens: the same lanes and float steps as qtile, with the
// per-row partial sums folded by hadd instead of a repack (for calls with very few tokens).
template <class F, int N>
void qrows8(const uint8_t* w, size_t stride, int n_rows, int64_t nb, const GemmActs& a, int64_t t0, float* y,
            int64_t ldy, int64_t row0, const float* bias) {
    alignas(32) int32_t o[8];
    for (int r = 0; r < 8; ++r) o[r] = static_cast<int32_t>(static_cast<size_t>(std::min(r, n_rows - 1)) * stride);
    const __m256i offs = _mm256_load_si256(reinterpret_cast<const __m256i*>(o));
    TokenActs ya[N];
    for (int j = 0; j < N; ++j) ya[j] = token_acts(a, t0 + j, nb);
    __m256 acc[N];
    for (int j = 0; j < N; ++j) acc[j] = _mm256_setzero_ps();
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blocks = w + b * F::kBytes;
        __m256i yv[N], h[N][4];
        for (int j = 0; j < N; ++j) yv[j] = loadu(ya[j].qs + b * QK);
        for (int pr = 0; pr < 4; ++pr) {
            const __m256i w0 = F::vals(blocks + o[2 * pr]), w1 = F::vals(blocks + o[2 * pr + 1]);
            for (int j = 0; j < N; ++j)
                h[j][pr] = _mm256_hadd_epi32(idot<F::kSigned>(zero, w0, yv[j]), idot<F::kSigned>(zero, w1, yv[j]));
        }
        __m256 d, m;
        load_dm<F>(blocks, offs, &d, &m);
        for (int j = 0; j < N; ++j) {
            const __m256i is = _mm256_add_epi32(fold8(h[j][0], h[j][1], h[j][2], h[j][3]), int_init<F>(ya[j], b));
            const __m256 sc = _mm256_mul_ps(d, _mm256_set1_ps(ya[j].d[b]));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), sc, acc[j]);
            if constexpr (F::kAsym) acc[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(ya[j].s[b]), acc[j]);
        }
    }
    for (int j = 0; j < N; ++j) store_rows(y + (t0 + j) * ldy + row0, bias ? bias + row0 : nullptr, n_rows, acc[j]);
}

// Tile shape: 16 rows x kQN tokens (32 registers) or 16 x 2 (16 registers).
constexpr int kQN = kRegs >= 32 ? 4 : 2;
// Below this many tokens the repack does not pay for itself.
constexpr int64_t kMinPackTokens = 4;
// Token block: the activations of one block stay in L2 while every 16-row group passes over them.
constexpr int64_t kQTokBlock = 256;

template <class F, int G>
void qtile_n(int n, const uint8_t* pk, size_t gstride, int64_t nb, const GemmActs& a, int64_t t0, float* y,
             int64_t ldy, int64_t row0, int n_rows, const float* bias) {
    static_assert(kQN <= 4, "extend the dispatch");
    switch (n) {
        case 1: return qtile<F, G, 1>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
        case 2: return qtile<F, G, 2>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
        case 3: return qtile<F, G, 3>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
        default: return qtile<F, G, kQN>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
    }
}

template <class F>
void qgemm(const uint8_t* w, size_t stride, int64_t r0, int64_t r1, const GemmActs& a, float* y, int64_t ldy,
           const float* bias) {
    const int64_t nb = a.n_in / QK, T = a.n_tokens;
    if (T < kMinPackTokens) {
        for (int64_t r = r0; r < r1; r += 8) {
            const int n = static_cast<int>(std::min<int64_t>(8, r1 - r));
            const uint8_t* wr = w + static_cast<size_t>(r) * stride;
            switch (T) {
                case 1: qrows8<F, 1>(wr, stride, n, nb, a, 0, y, ldy, r, bias); break;
                case 2: qrows8<F, 2>(wr, stride, n, nb, a, 0, y, ldy, r, bias); break;
                default: qrows8<F, 3>(wr, stride, n, nb, a, 0, y, ldy, r, bias); break;
            }
        }
        return;
    }
    constexpr size_t BS = kPackBlock<F>;
    const size_t gstride = static_cast<size_t>(nb) * BS;
    thread_local std::vector<uint8_t> buf;
    if (buf.size() < 2 * gstride + 64) buf.resize(2 * gstride + 64);
    uint8_t* pk = reinterpret_cast<uint8_t*>(align64(reinterpret_cast<uintptr_t>(buf.data())));
    for (int64_t tb = 0; tb < T; tb += kQTokBlock) {
        const int64_t te = std::min(T, tb + kQTokBlock);
        for (int64_t r = r0; r < r1; r += 16) {
            const int n = static_cast<int>(std::min<int64_t>(16, r1 - r));
            const uint8_t* wr = w + static_cast<size_t>(r) * stride;
            repack8<F>(wr, stride, std::min(n, 8), nb, pk);
            if (n > 8) repack8<F>(wr + 8 * stride, stride, n - 8, nb, pk + gstride);
            for (int64_t t = tb; t < te; t += kQN) {
                const int nt = static_cast<int>(std::min<int64_t>(kQN, te - t));
                if (n > 8)
                    qtile_n<F, 2>(nt, pk, gstride, nb, a, t, y, ldy, r, n, bias);
                else
                    qtile_n<F, 1>(nt, pk, gstride, nb, a, t, y, ldy, r, n, bias);
            }
        }
    }
}

// ---- float weights
struct LF32 {
    static __m256 load(const uint8_t* row, int64_t k) { return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k); }
    static __m256 load_tail(const uint8_t* row, int64_t k, int n) {
        alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(t, reinterpret_cast<const float*>(row) + k, static_cast<size_t>(n) * 4);
        return _mm256_load_ps(t);
    }
};
struct LF16 {
    static __m256 load(const uint8_t* row, int64_t k) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
    }
    static __m256 load_tail(const uint8_t* row, int64_t k, int n) {
        alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(t, row + 2 * k, static_cast<size_t>(n) * 2);
        return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
    }
};
struct LBF16 {
    static __m256 widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
    static __m256 load(const uint8_t* row, int64_t k) {
        return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
    }
    static __m256 load_tail(const uint8_t* row, int64_t k, int n) {
        alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(t, row + 2 * k, static_cast<size_t>(n) * 2);
        return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
    }
};

inline __m256 load_x_tail(const float* x, int n) {
    alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(t, x, static_cast<size_t>(n) * 4);
    return _mm256_load_ps(t);
}

// ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)) of one vector.
inline float hsum8(__m256 v) {
    const __m128 a = _mm_hadd_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 b = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
// The same sums of 8 vectors at once: lane i = hsum8(v[i]).
inline __m256 hsum8x8(const __m256 v[8]) {
    const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}

// RM rows x RN tokens, one 8-lane accumulator per output.
template <class L, int RM, int RN>
void ftile(const uint8_t* w, size_t stride, const float* x, int64_t K, float* y, int64_t ldy, const float* bias) {
    __m256 acc[RM * RN];
    for (int i = 0; i < RM * RN; ++i) acc[i] = _mm256_setzero_ps();
    const int64_t K8 = K & ~static_cast<int64_t>(7);
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 wv[RM];
        for (int i = 0; i < RM; ++i) wv[i] = L::load(w + i * stride, k);
        for (int j = 0; j < RN; ++j) {
            const __m256 xv = _mm256_loadu_ps(x + j * K + k);
            for (int i = 0; i < RM; ++i) acc[j * RM + i] = _mm256_fmadd_ps(wv[i], xv, acc[j * RM + i]);
        }
    }
    if (K8 < K) {
        const int n = static_cast<int>(K - K8);
        __m256 wv[RM];
        for (int i = 0; i < RM; ++i) wv[i] = L::load_tail(w + i * stride, K8, n);
        for (int j = 0; j < RN; ++j) {
            const __m256 xv = load_x_tail(x + j * K + K8, n);
            for (int i = 0; i < RM; ++i) acc[j * RM + i] = _mm256_fmadd_ps(wv[i], xv, acc[j * RM + i]);
        }
    }
    alignas(32) float out[RM * RN + 8];
    constexpr int kFull = RM * RN / 8 * 8;
    for (int o = 0; o < kFull; o += 8) _mm256_store_ps(out + o, hsum8x8(acc + o));
    for (int o = kFull; o < RM * RN; ++o) out[o] = hsum8(acc[o]);
    for (int j = 0; j < RN; ++j)
        for (int i = 0; i < RM; ++i) y[j * ldy + i] = bias ? out[j * RM + i] + bias[i] : out[j * RM + i];
}

// Tile shapes: with 32 registers 4 rows x 5 tokens (20 accumulators), else 4 x 2; a lone token
// takes 8 rows so that enough independent accumulators hide the FMA latency.
constexpr int kFM = 4, kFN = kRegs >= 32 ? 5 : 2, kFM1 = 8;

template <class L, int RN>
void ftile_m(int m, const uint8_t* w, size_t stride, const float* x, int64_t K, float* y, int64_t ldy,
             const float* bias) {
    switch (m) {
        case 1: return ftile<L, 1, RN>(w, stride, x, K, y, ldy, bias);
        case 2: return ftile<L, 2, RN>(w, stride, x, K, y, ldy, bias);
        case 3: return ftile<L, 3, RN>(w, stride, x, K, y, ldy, bias);
        default: return ftile<L, kFM, RN>(w, stride, x, K, y, ldy, bias);
    }
}

template <class L>
void ftile_mn(int m, int n, const uint8_t* w, size_t stride, const float* x, int64_t K, float* y, int64_t ldy,
              const float* bias) {
    static_assert(kFN <= 5 && kFM == 4, "extend the dispatch");
    switch (n) {
        case 1: return ftile_m<L, 1>(m, w, stride, x, K, y, ldy, bias);
        case 2: return ftile_m<L, 2>(m, w, stride, x, K, y, ldy, bias);
        case 3: return ftile_m<L, 3>(m, w, stride, x, K, y, ldy, bias);
        case 4: return ftile_m<L, 4>(m, w, stride, x, K, y, ldy, bias);
        default: return ftile_m<L, kFN>(m, w, stride, x, K, y, ldy, bias);
    }
}

template <class L>
void fgemm(const uint8_t* w, size_t stride, int64_t r0, int64_t r1, const GemmActs& a, float* y, int64_t ldy,
           const float* bias) {
    const int64_t K = a.n_in, T = a.n_tokens;
    const float* x = a.x;
    if (T == 1) {
        int64_t r = r0;
        for (; r + kFM1 <= r1; r += kFM1)
            ftile<L, kFM1, 1>(w + r * stride, stride, x, K, y + r, ldy, bias ? bias + r : nullptr);
        for (; r < r1; r += kFM) {
            const int m = static_cast<int>(std::min<int64_t>(kFM, r1 - r));
            ftile_m<L, 1>(m, w + r * stride, stride, x, K, y + r, ldy, bias ? bias + r : nullptr);
        }
        return;
    }
    // Row panels of ~256 KB stay in L2 while the token tiles (in L1) pass over them.
    const int64_t panel = std::max<int64_t>(kFM, (static_cast<int64_t>(256 << 10) / static_cast<int64_t>(stride)) & ~3);
    for (int64_t rb = r0; rb < r1; rb += panel) {
        const int64_t re = std::min(r1, rb + panel);
        for (int64_t t = 0; t < T; t += kFN) {
            const int n = static_cast<int>(std::min<int64_t>(kFN, T - t));
            for (int64_t r = rb; r < re; r += kFM) {
                const int m = static_cast<int>(std::min<int64_t>(kFM, re - r));
                ftile_mn<L>(m, n, w + r * stride, stride, x + t * K, K, y + t * ldy + r, ldy,
                            bias ? bias + r : nullptr);
            }
        }
    }
}

}  // namespace
#endif  // X2L_GEMM_AVX2

// ------------------------------------------------------------------------------ 4. dispatch
bool gemm_supported(DType w) {
#if defined(X2L_GEMM_AVX2)
    switch (w) {
        case DType::F32:
        case DType::F16:
        case DType::BF16:
        case DType::Q4_0:
        case DType::Q4_1:
        case DType::Q5_0:
        case DType::Q5_1:
        case DType::Q8_0: return true;
        default: return false;
    }
#else
    (void)w;
    return false;
#endif
}

void gemm(DType wt, const uint8_t* w, size_t w_stride, int64_t r0, int64_t r1, const GemmActs& a, float* y,
          int64_t ldy, const float* bias) {
    if (r0 >= r1 || a.n_tokens <= 0) return;
#if defined(X2L_GEMM_AVX2)
    switch (wt) {
        case DType::F32: return fgemm<LF32>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::F16: return fgemm<LF16>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::BF16: return fgemm<LBF16>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q4_0: return qgemm<FQ4_0>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q4_1: return qgemm<FQ4_1>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q5_0: return qgemm<FQ5_0>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q5_1: return qgemm<FQ5_1>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q8_0: return qgemm<FQ8_0>(w, w_stride, r0, r1, a, y, ldy, bias);
        default: break;
    }
#endif
    gemm_reference(wt, w, w_stride, r0, r1, a, y, ldy, bias);
}

}  // namespace x2l
