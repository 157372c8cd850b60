// Register-tiled matmul kernels (see gemm.h for the arithmetic every path reproduces).
//
// Layout of this file:
//   1. block formats (core/formats.h)   2. portable scalar reference   3. activation packing (GemmActs)
//   tiled driver: tiled_gemm<K> is the one repack-then-tile loop; each ISA below only supplies
//        descriptors K (how a group of rows is packed, and its register tiles)
//   4. x86: AVX2 + FMA + F16C, VNNI when compiled for it, AVX-512 tiles when available
//        quantized weights: rows are repacked 8 (AVX2) or 16 (AVX-512) at a time so that one
//        vector holds 4 values of each row; a broadcast of 4 activation bytes then feeds one dot
//        instruction that advances every row, and each output owns one vector lane (its
//        per-block scale is a lane of a vector multiply). Tiles of 16-32 rows x 2-4 tokens reuse
//        every weight load across the tokens and every activation broadcast across the rows.
//        K-quants add an exact integer multiply by the sub-block scales per lane.
//        A single token (decode) skips the repack: each row is dotted in its own layout and the
//        row sums are folded into the same lanes (hadd / a small buffer), then the same float
//        steps; the next group of rows is prefetched meanwhile.
//        float weights: tiles of rows x tokens with one 8-lane accumulator per output; with
//        AVX-512 a zmm carries two rows' accumulators (one per 256-bit half) over a float panel.
//        -DX2L_NO_ZMM keeps AVX-512 machines on the 256-bit kernels (for comparisons).
//   5. NEON (aarch64): float tiles as above (two float32x4 per output); 32-value formats with
//        4 rows x N tokens, sdot (or smull + sadalp) and addp folding into the row lanes.
//   6. dispatch
#include "cpu/gemm.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/common.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define X2L_GEMM_AVX2 1
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() placeholders that trip the
// uninitialized-use warnings once inlined; the warnings point into the header, so silence them there.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define X2L_GEMM_NEON 1
#include <arm_neon.h>
#endif

namespace x2l {

namespace {

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
// Block layouts: core/formats.h (BlockQ4_0 ... BlockQ8_K); fields are read at their offsetof so the
// layouts are defined once. d, m and s are fp16.
struct Block32Info {
    size_t bytes;
    bool asym;  // value = d * q + m (else d * q)
};

// d (and m) are the first two fp16 of every legacy block: the kernels read both with one 32-bit load.
static_assert(offsetof(BlockQ4_0, d) == 0 && offsetof(BlockQ4_1, m) == 2 && offsetof(BlockQ5_1, m) == 2, "layout");

bool block32_info(DType t, Block32Info* out) {
    switch (t) {
        case DType::Q4_0: *out = {sizeof(BlockQ4_0), false}; return true;
        case DType::Q4_1: *out = {sizeof(BlockQ4_1), true}; return true;
        case DType::Q5_0: *out = {sizeof(BlockQ5_0), false}; return true;
        case DType::Q5_1: *out = {sizeof(BlockQ5_1), true}; return true;
        case DType::Q8_0: *out = {sizeof(BlockQ8_0), false}; return true;
        default: return false;
    }
}

// The integer values of one weight block (what d multiplies), scale and min.
void block32_values(DType t, const uint8_t* b, int q[QK], float* d, float* m) {
    *d = fp16_to_fp32(load_u16(b));
    *m = 0.0f;
    switch (t) {
        case DType::Q4_0: {
            const uint8_t* qs = b + offsetof(BlockQ4_0, qs);
            for (int j = 0; j < 16; ++j) {
                q[j] = (qs[j] & 0x0f) - 8;
                q[j + 16] = (qs[j] >> 4) - 8;
            }
            return;
        }
        case DType::Q4_1: {
            *m = fp16_to_fp32(load_u16(b + offsetof(BlockQ4_1, m)));
            const uint8_t* qs = b + offsetof(BlockQ4_1, qs);
            for (int j = 0; j < 16; ++j) {
                q[j] = qs[j] & 0x0f;
                q[j + 16] = qs[j] >> 4;
            }
            return;
        }
        case DType::Q5_0:
        case DType::Q5_1: {
            const bool asym = t == DType::Q5_1;
            if (asym) *m = fp16_to_fp32(load_u16(b + offsetof(BlockQ5_1, m)));
            const uint32_t qh = load_u32(b + (asym ? offsetof(BlockQ5_1, qh) : offsetof(BlockQ5_0, qh)));
            const uint8_t* qs = b + (asym ? offsetof(BlockQ5_1, qs) : offsetof(BlockQ5_0, qs));
            const int off = asym ? 0 : 16;
            for (int j = 0; j < 16; ++j) {
                q[j] = ((qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4)) - off;
                q[j + 16] = ((qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4)) - off;
            }
            return;
        }
        case DType::Q8_0:
            for (int j = 0; j < QK; ++j) q[j] = static_cast<int8_t>(b[offsetof(BlockQ8_0, qs) + j]);
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
constexpr size_t kQ4KBytes = sizeof(BlockQ4_K);
// Q6_K block {ql[128], qh[64], scales[16] (int8), d}: see q6k_values.
constexpr size_t kQ6KBytes = sizeof(BlockQ6_K);

void q6k_values(const uint8_t* b, int q[QK_K]) {
    for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = b + offsetof(BlockQ6_K, ql) + 64 * h;
        const uint8_t* qh = b + offsetof(BlockQ6_K, qh) + 32 * h;
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
        unpack_k4_scales(x + offsetof(BlockQ4_K, scales), sc, mn);
        int isum = 0, msum = 0;
        for (int s = 0; s < 8; ++s) {
            const int c = s / 2, hi = s % 2;
            int dot = 0;
            for (int l = 0; l < 32; ++l) {
                const uint8_t byte = x[offsetof(BlockQ4_K, qs) + 32 * c + l];
                dot += (hi ? byte >> 4 : byte & 0x0f) * y[32 * s + l];
            }
            isum += sc[s] * dot;
            msum += mn[s] * (bs[2 * s] + bs[2 * s + 1]);
        }
        const float dy = a.d[t * nb + b];
        acc = std::fma(static_cast<float>(isum), fp16_to_fp32(load_u16(x + offsetof(BlockQ4_K, d))) * dy, acc);
        acc = std::fma(static_cast<float>(-msum), fp16_to_fp32(load_u16(x + offsetof(BlockQ4_K, dmin))) * dy, acc);
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
            isum += static_cast<int8_t>(x[offsetof(BlockQ6_K, scales) + g]) * dot;
        }
        acc = std::fma(static_cast<float>(isum), fp16_to_fp32(load_u16(x + offsetof(BlockQ6_K, d))) * a.d[t * nb + b], acc);
    }
    return acc;
}

float ref_float(DType wt, const uint8_t* wrow, const float* x, int64_t n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = 0; k < n; ++k) s[k % 8] = std::fma(float_weight(wt, wrow, k), x[k], s[k % 8]);
    // A ragged last chunk is zero-padded in the SIMD kernels: its empty lanes add +0 (which turns
    // a -0 lane into +0).
    for (int64_t k = n; k % 8 != 0; ++k) s[k % 8] = std::fma(0.0f, 0.0f, s[k % 8]);
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

}  // namespace

// ------------------------------------------------------------------------------ 3. activations
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
            return align64(T * nb * QK_K) + align64(T * nb * 4) + align64(T * nb * 32) + align64(T * nb * 16) + 64;
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
        p += align64(T * nb * 32);
        a.bsums32 = reinterpret_cast<const int16_t*>(p);
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
        const int64_t nb = a.n_in / QK_K;
        for (int64_t b = 0; b < nb; ++b, src += sizeof(BlockQ8_K)) {
            std::memcpy(const_cast<int8_t*>(a.qs) + (t * nb + b) * QK_K, src + offsetof(BlockQ8_K, qs), QK_K);
            std::memcpy(const_cast<float*>(a.d) + t * nb + b, src + offsetof(BlockQ8_K, d), 4);
            auto* bs = const_cast<int16_t*>(a.bsums) + (t * nb + b) * 16;
            std::memcpy(bs, src + offsetof(BlockQ8_K, bsums), 32);
            auto* b32 = const_cast<int16_t*>(a.bsums32) + (t * nb + b) * 8;
            for (int s = 0; s < 8; ++s) b32[s] = static_cast<int16_t>(bs[2 * s] + bs[2 * s + 1]);  // |sum| <= 32 * 128
        }
        return;
    }
    const bool q81 = a.type == DType::Q8_1;
    const size_t bytes = q81 ? sizeof(BlockQ8_1) : sizeof(BlockQ8_0),
                 qoff = q81 ? offsetof(BlockQ8_1, qs) : offsetof(BlockQ8_0, qs);
    const int64_t nb = a.n_in / QK;
    auto* qs = const_cast<int8_t*>(a.qs) + t * nb * QK;
    auto* d = const_cast<float*>(a.d) + t * nb;
    auto* s = const_cast<float*>(a.s) + t * nb;
    auto* sum = const_cast<int32_t*>(a.sum) + t * nb;
    for (int64_t b = 0; b < nb; ++b, src += bytes) {
        std::memcpy(qs + b * QK, src + qoff, QK);
        d[b] = fp16_to_fp32(load_u16(src));
        s[b] = q81 ? fp16_to_fp32(load_u16(src + offsetof(BlockQ8_1, s))) : 0.0f;
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

// ------------------------------------------------------------------------------ tiled driver
namespace {

// Every multi-token kernel below is a descriptor K that tiled_gemm runs:
//   K::group_rows(n_in, stride)   rows packed (or read in place) together, a multiple of its row tile
//   K::token_block(n_tokens)      tokens whose activations stay in cache while the row groups pass
//   K::kTokens                    tokens per tile
//   K::pack_bytes(n_in)           bytes of one packed group; 0: the kernel reads the rows in place
//   K::pack(rows, stride, n_rows, n_in, dst)
//   K::tile(g, g_stride, n_tokens, a, t0, y, ldy, row0, n_rows, bias)   g: the packed group (or the
//                                 rows themselves, g_stride apart), every row of it x n_tokens from t0
// so the repack-then-tile loop exists once, and each ISA only supplies its packing and its tiles.
template <class K>
void tiled_gemm(const uint8_t* w, size_t stride, int64_t r0, int64_t r1, const GemmActs& a, float* y, int64_t ldy,
                const float* bias) {
    const int64_t T = a.n_tokens, group = K::group_rows(a.n_in, stride), tblock = K::token_block(T);
    const size_t bytes = K::pack_bytes(a.n_in);
    thread_local std::vector<uint8_t> buf;
    if (buf.size() < bytes + 64) buf.resize(bytes + 64);
    uint8_t* pk = reinterpret_cast<uint8_t*>(align64(reinterpret_cast<uintptr_t>(buf.data())));
    for (int64_t tb = 0; tb < T; tb += tblock) {
        const int64_t te = std::min(T, tb + tblock);
        for (int64_t r = r0; r < r1; r += group) {
            const int n = static_cast<int>(std::min<int64_t>(group, r1 - r));
            const uint8_t* rows = w + static_cast<size_t>(r) * stride;
            if (bytes) K::pack(rows, stride, n, a.n_in, pk);
            for (int64_t t = tb; t < te; t += K::kTokens) {
                const int nt = static_cast<int>(std::min<int64_t>(K::kTokens, te - t));
                K::tile(bytes ? pk : rows, stride, nt, a, t, y, ldy, r, n, bias);
            }
        }
    }
}

// Quantized kernels pack a group as two halves of R::kL rows (R::repack, R::half_bytes each) and run
// tiles of both halves (R::tile_g<2>) or of the first only (R::tile_g<1>) when the group is short.
template <class R>
struct TwoHalves {
    static int64_t group_rows(int64_t, size_t) { return 2 * R::kL; }
    static size_t pack_bytes(int64_t n_in) { return 2 * R::half_bytes(n_in); }
    static void pack(const uint8_t* w, size_t stride, int n, int64_t n_in, uint8_t* dst) {
        R::repack(w, stride, std::min(n, R::kL), n_in, dst);
        if (n > R::kL) R::repack(w + R::kL * stride, stride, n - R::kL, n_in, dst + R::half_bytes(n_in));
    }
    static void tile(const uint8_t* pk, size_t, int nt, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                     int64_t row0, int n, const float* bias) {
        if (n > R::kL) R::template tile_g<2>(nt, pk, R::half_bytes(a.n_in), a, t0, y, ldy, row0, n, bias);
        else R::template tile_g<1>(nt, pk, R::half_bytes(a.n_in), a, t0, y, ldy, row0, n, bias);
    }
};

}  // namespace

// ------------------------------------------------------------------------------ 4. x86
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
    static constexpr size_t kBytes = sizeof(BlockQ4_0);
    static constexpr int kOff = 8;
    static constexpr bool kAsym = false, kSigned = false;
    static __m256i vals(const uint8_t* b) { return nibbles(b + offsetof(BlockQ4_0, qs)); }
};
struct FQ4_1 {
    static constexpr size_t kBytes = sizeof(BlockQ4_1);
    static constexpr int kOff = 0;
    static constexpr bool kAsym = true, kSigned = false;
    static __m256i vals(const uint8_t* b) { return nibbles(b + offsetof(BlockQ4_1, qs)); }
};
struct FQ5_0 {
    static constexpr size_t kBytes = sizeof(BlockQ5_0);
    static constexpr int kOff = 16;
    static constexpr bool kAsym = false, kSigned = false;
    static __m256i vals(const uint8_t* b) {
        return _mm256_or_si256(nibbles(b + offsetof(BlockQ5_0, qs)), bit5(b + offsetof(BlockQ5_0, qh)));
    }
};
struct FQ5_1 {
    static constexpr size_t kBytes = sizeof(BlockQ5_1);
    static constexpr int kOff = 0;
    static constexpr bool kAsym = true, kSigned = false;
    static __m256i vals(const uint8_t* b) {
        return _mm256_or_si256(nibbles(b + offsetof(BlockQ5_1, qs)), bit5(b + offsetof(BlockQ5_1, qh)));
    }
};
struct FQ8_0 {
    static constexpr size_t kBytes = sizeof(BlockQ8_0);
    static constexpr bool kAsym = false;
#if defined(X2L_GEMM_VNNI)
    // q + 128 = q ^ 0x80 as a byte: dpbusd takes the full 0..255 range exactly.
    static constexpr int kOff = 128;
    static constexpr bool kSigned = false;
    static __m256i vals(const uint8_t* b) {
        return _mm256_xor_si256(loadu(b + offsetof(BlockQ8_0, qs)), _mm256_set1_epi8(-128));
    }
#else
    static constexpr int kOff = 0;
    static constexpr bool kSigned = true;
    static __m256i vals(const uint8_t* b) { return loadu(b + offsetof(BlockQ8_0, qs)); }
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

// Fetches `bytes` from p into the cache over `steps` calls, an equal share per call. The
// single-token kernels read a group of rows as several interleaved streams (one per row), which the
// hardware prefetchers follow poorly; fetching the next group while this one is computed measured
// 1.3-1.5x faster decode matmuls on an AVX2 EPYC.
class GroupPrefetch {
  public:
    GroupPrefetch(const uint8_t* p, size_t bytes, int64_t steps)
        : p_(reinterpret_cast<const char*>(p)), lines_((bytes + 63) / 64),
          per_step_(steps > 0 ? (lines_ + static_cast<size_t>(steps) - 1) / static_cast<size_t>(steps) : 0) {}
    void step(int64_t i) const {
        const size_t l0 = static_cast<size_t>(i) * per_step_, l1 = std::min(lines_, l0 + per_step_);
        for (size_t l = l0; l < l1; ++l) _mm_prefetch(p_ + 64 * l, _MM_HINT_T0);
    }

  private:
    const char* p_;
    size_t lines_, per_step_;
};

// 8 rows in their own layout x N tokens: the same lanes and float steps as qtile, with the
// per-row partial sums folded by hadd instead of a repack (for calls with very few tokens).
// next: the following rows (next_bytes of them), prefetched meanwhile.
template <class F, int N>
void qrows8(const uint8_t* w, size_t stride, int n_rows, int64_t nb, const GemmActs& a, int64_t t0, float* y,
            int64_t ldy, int64_t row0, const float* bias, const uint8_t* next = nullptr, size_t next_bytes = 0) {
    const GroupPrefetch pf(next, next ? next_bytes : 0, nb);
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
        pf.step(b);
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
// A single token (decode) skips the repack: measured slower than the fold path there, faster
// from two tokens on.
constexpr int64_t kMinPackTokens = 2;
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


#if defined(X2L_GEMM_VNNI) && defined(__AVX512F__) && defined(__AVX512BW__) && !defined(X2L_NO_ZMM)
// ---- AVX-512 tile for the 32-value formats: 16 rows per vector (two 8-row transposes per
// chunk), the same per-lane steps as qtile. Repacked block of 16 rows: 8 chunks x [16 rows x 4
// values], then 16 scales, then 16 mins (asymmetric formats).
#define X2L_GEMM_ZQ 1
template <class F>
constexpr size_t kPack16 = 512 + 64 + (F::kAsym ? 64 : 0);

template <class F>
void repack16(const uint8_t* w, size_t stride, int n, int64_t nb, uint8_t* dst) {
    alignas(32) int32_t o[16];
    for (int r = 0; r < 16; ++r) o[r] = static_cast<int32_t>(static_cast<size_t>(std::min(r, n - 1)) * stride);
    const __m256i offs[2] = {_mm256_load_si256(reinterpret_cast<const __m256i*>(o)),
                             _mm256_load_si256(reinterpret_cast<const __m256i*>(o + 8))};
    for (int64_t b = 0; b < nb; ++b, dst += kPack16<F>) {
        const uint8_t* blocks = w + b * F::kBytes;
        for (int h = 0; h < 2; ++h) {
            __m256i rows[8], cols[8];
            for (int r = 0; r < 8; ++r) rows[r] = F::vals(blocks + o[8 * h + r]);
            transpose8(rows, cols);
            for (int c = 0; c < 8; ++c) _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 64 * c + 32 * h), cols[c]);
            __m256 d, m;
            load_dm<F>(blocks, offs[h], &d, &m);
            _mm256_store_ps(reinterpret_cast<float*>(dst + 512 + 32 * h), d);
            if constexpr (F::kAsym) _mm256_store_ps(reinterpret_cast<float*>(dst + 576 + 32 * h), m);
        }
    }
}

inline __m512i zbcast32(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

template <class F, int G, int N>
void zqtile(const uint8_t* pk, size_t gstride, int64_t nb, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
            int64_t row0, int n_rows, const float* bias) {
    constexpr size_t BS = kPack16<F>;
    TokenActs ya[N];
    for (int j = 0; j < N; ++j) ya[j] = token_acts(a, t0 + j, nb);
    __m512 acc[G][N];
    for (int g = 0; g < G; ++g)
        for (int j = 0; j < N; ++j) acc[g][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = pk + b * BS;
        __m512i is[G][N];
        for (int j = 0; j < N; ++j) {
            const __m512i init = F::kOff ? _mm512_set1_epi32(-F::kOff * ya[j].sum[b]) : _mm512_setzero_si512();
            for (int g = 0; g < G; ++g) is[g][j] = init;
        }
        for (int c = 0; c < 8; ++c) {
            __m512i wv[G];
            for (int g = 0; g < G; ++g) wv[g] = _mm512_load_si512(p + g * gstride + 64 * c);
            for (int j = 0; j < N; ++j) {
                const __m512i yb = zbcast32(ya[j].qs + b * QK + 4 * c);
                for (int g = 0; g < G; ++g) is[g][j] = _mm512_dpbusd_epi32(is[g][j], wv[g], yb);
            }
        }
        for (int g = 0; g < G; ++g) {
            const __m512 dv = _mm512_load_ps(p + g * gstride + 512);
            for (int j = 0; j < N; ++j) {
                const __m512 sc = _mm512_mul_ps(dv, _mm512_set1_ps(ya[j].d[b]));
                acc[g][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[g][j]), sc, acc[g][j]);
            }
            if constexpr (F::kAsym) {
                const __m512 mv = _mm512_load_ps(p + g * gstride + 576);
                for (int j = 0; j < N; ++j) acc[g][j] = _mm512_fmadd_ps(mv, _mm512_set1_ps(ya[j].s[b]), acc[g][j]);
            }
        }
    }
    for (int j = 0; j < N; ++j)
        for (int g = 0; g < G; ++g) {
            const int n = n_rows - 16 * g;
            if (n <= 0) continue;
            float* dst = y + (t0 + j) * ldy + row0 + 16 * g;
            const float* bg = bias ? bias + row0 + 16 * g : nullptr;
            const __mmask16 m = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
            __m512 v = acc[g][j];
            if (bg) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bg));
            _mm512_mask_storeu_ps(dst, m, v);
        }
}

constexpr int kZQN = 4;  // 32 rows x 4 tokens: 16 accumulators

template <class F, int G>
void zqtile_n(int n, const uint8_t* pk, size_t gstride, int64_t nb, const GemmActs& a, int64_t t0, float* y,
              int64_t ldy, int64_t row0, int n_rows, const float* bias) {
    switch (n) {
        case 1: return zqtile<F, G, 1>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
        case 2: return zqtile<F, G, 2>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
        case 3: return zqtile<F, G, 3>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
        default: return zqtile<F, G, kZQN>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
    }
}

// 32 rows (two 16-lane halves) x kZQN tokens.
template <class F>
struct Q32Zmm : TwoHalves<Q32Zmm<F>> {
    static constexpr int kL = 16, kTokens = kZQN;
    static int64_t token_block(int64_t) { return kQTokBlock; }
    static size_t half_bytes(int64_t n_in) { return static_cast<size_t>(n_in / QK) * kPack16<F>; }
    static void repack(const uint8_t* w, size_t stride, int n, int64_t n_in, uint8_t* dst) {
        repack16<F>(w, stride, n, n_in / QK, dst);
    }
    template <int G>
    static void tile_g(int nt, const uint8_t* pk, size_t gstride, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                       int64_t row0, int n_rows, const float* bias) {
        zqtile_n<F, G>(nt, pk, gstride, a.n_in / QK, a, t0, y, ldy, row0, n_rows, bias);
    }
};
#endif  // AVX-512 VNNI

// 16 rows (two 8-lane halves) x kQN tokens.
template <class F>
struct Q32Ymm : TwoHalves<Q32Ymm<F>> {
    static constexpr int kL = 8, kTokens = kQN;
    static int64_t token_block(int64_t) { return kQTokBlock; }
    static size_t half_bytes(int64_t n_in) { return static_cast<size_t>(n_in / QK) * kPackBlock<F>; }
    static void repack(const uint8_t* w, size_t stride, int n, int64_t n_in, uint8_t* dst) {
        repack8<F>(w, stride, n, n_in / QK, dst);
    }
    template <int G>
    static void tile_g(int nt, const uint8_t* pk, size_t gstride, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                       int64_t row0, int n_rows, const float* bias) {
        qtile_n<F, G>(nt, pk, gstride, a.n_in / QK, a, t0, y, ldy, row0, n_rows, bias);
    }
};

template <class F>
void qgemm(const uint8_t* w, size_t stride, int64_t r0, int64_t r1, const GemmActs& a, float* y, int64_t ldy,
           const float* bias) {
    const int64_t nb = a.n_in / QK, T = a.n_tokens;
    static_assert(kMinPackTokens == 2, "the fold path below handles one token");
    if (T < kMinPackTokens) {
        for (int64_t r = r0; r < r1; r += 8) {
            const int n = static_cast<int>(std::min<int64_t>(8, r1 - r));
            const int64_t n_next = std::min<int64_t>(8, r1 - r - n);
            qrows8<F, 1>(w + static_cast<size_t>(r) * stride, stride, n, nb, a, 0, y, ldy, r, bias,
                         w + static_cast<size_t>(r + n) * stride, static_cast<size_t>(std::max<int64_t>(0, n_next)) * stride);
        }
        return;
    }
#if defined(X2L_GEMM_ZQ)
    return tiled_gemm<Q32Zmm<F>>(w, stride, r0, r1, a, y, ldy, bias);
#else
    return tiled_gemm<Q32Ymm<F>>(w, stride, r0, r1, a, y, ldy, bias);
#endif
}

// ---- K-quants against Q8_K: 256-value super-blocks, repacked 8 rows at a time like the legacy
// formats, with the integer sub-block scales applied per lane (vpmulld) before the float step.
inline __m256i gather32(const uint8_t* p, __m256i offs) {
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(p), offs, 1);
}
inline __m256i byte_of(__m256i v, int e) {  // unsigned byte e of every 32-bit lane
    return _mm256_and_si256(_mm256_srli_epi32(v, 8 * e), _mm256_set1_epi32(0xff));
}
inline __m256i sbyte_of(__m256i v, int e) {  // signed byte e of every 32-bit lane
    return _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * e), 24);
}
inline __m256i pack16x2(__m256i lo, __m256i hi) {  // int16 lo | int16 hi << 16 per lane
    return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(hi, 16));
}

// Q4_K {d, dmin, scales[12], qs[128]}. Repacked super-block of 8 rows:
//   [0, 2048)    sub-block s, chunk c: 8 rows x 4 nibbles (values 32s + 4c ..)
//   [2048, 2304) 6-bit scales as int32 [s][row]
//   [2304, 2432) mins as int16 pairs (mn[2p], mn[2p+1]) [p][row]
//   [2432, 2496) d [row], dmin [row] (float)
struct FQ4K {
    static constexpr size_t kBytes = sizeof(BlockQ4_K), kSc = 2048, kMn = 2304, kD = 2432, kDm = 2464, kPack = 2496;
    // block fields
    static constexpr size_t kScales = offsetof(BlockQ4_K, scales), kQs = offsetof(BlockQ4_K, qs);
    // scale = lanes / 8 (every region grows with the lane count), half = which 8 rows of a 16-row group.
    static void repack(const uint8_t* blocks, const int32_t o[8], __m256i offs, uint8_t* dst, int scale = 1, int half = 0) {
        auto at = [&](size_t off) { return dst + off * scale + 32 * half; };
        for (int c = 0; c < 4; ++c) {  // 32 bytes of qs hold sub-blocks 2c (low nibbles) and 2c + 1
            __m256i lo[8], hi[8], t[8];
            for (int r = 0; r < 8; ++r) {
                const __m256i q = loadu(blocks + o[r] + kQs + 32 * c);
                lo[r] = _mm256_and_si256(q, _mm256_set1_epi8(0x0f));
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi8(0x0f));
            }
            transpose8(lo, t);
            for (int k = 0; k < 8; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(at(512 * c + 32 * k)), t[k]);
            transpose8(hi, t);
            for (int k = 0; k < 8; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(at(512 * c + 256 + 32 * k)), t[k]);
        }
        // The 12 scale bytes as 3 words per row (ggml's packing, decoded on all 8 lanes at once).
        const __m256i w0 = gather32(blocks + kScales, offs), w1 = gather32(blocks + kScales + 4, offs),
                      w2 = gather32(blocks + kScales + 8, offs);
        const __m256i m6 = _mm256_set1_epi32(0x3f3f3f3f), m4 = _mm256_set1_epi32(0x0f0f0f0f),
                      m2 = _mm256_set1_epi32(0x30303030);
        const __m256i sc_lo = _mm256_and_si256(w0, m6), mn_lo = _mm256_and_si256(w1, m6);
        const __m256i sc_hi = _mm256_or_si256(_mm256_and_si256(w2, m4), _mm256_and_si256(_mm256_srli_epi32(w0, 2), m2));
        const __m256i mn_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(w2, 4), m4),
                                              _mm256_and_si256(_mm256_srli_epi32(w1, 2), m2));
        auto st = [&](size_t off, __m256i v) { _mm256_store_si256(reinterpret_cast<__m256i*>(at(off)), v); };
        for (int e = 0; e < 4; ++e) {
            st(kSc + 32 * e, byte_of(sc_lo, e));
            st(kSc + 32 * (4 + e), byte_of(sc_hi, e));
        }
        st(kMn + 0, pack16x2(byte_of(mn_lo, 0), byte_of(mn_lo, 1)));
        st(kMn + 32, pack16x2(byte_of(mn_lo, 2), byte_of(mn_lo, 3)));
        st(kMn + 64, pack16x2(byte_of(mn_hi, 0), byte_of(mn_hi, 1)));
        st(kMn + 96, pack16x2(byte_of(mn_hi, 2), byte_of(mn_hi, 3)));
        const __m256i dm = gather32(blocks, offs);
        _mm256_store_ps(reinterpret_cast<float*>(at(kD)), _mm256_cvtph_ps(low16(dm)));
        _mm256_store_ps(reinterpret_cast<float*>(at(kDm)), _mm256_cvtph_ps(low16(_mm256_srli_epi32(dm, 16))));
    }
};

// Q6_K {ql[128], qh[64], scales[16] (int8), d}. Values kept unsigned (q + 32, 0..63); the
// offset returns through the activations' 16-value sums. Repacked super-block of 8 rows:
//   [0, 2048)    sub-block g (16 values), chunk c (4): 8 rows x 4 values
//   [2048, 2560) scales as int32 [g][row]
//   [2560, 2816) scales as int16 pairs (sc[2p], sc[2p+1]) [p][row]
//   [2816, 2848) d [row] (float)
struct FQ6K {
    static constexpr size_t kBytes = sizeof(BlockQ6_K), kSc = 2048, kScP = 2560, kD = 2816, kPack = 2848;
    // block fields
    static constexpr size_t kQl = offsetof(BlockQ6_K, ql), kQh = offsetof(BlockQ6_K, qh),
                            kScales = offsetof(BlockQ6_K, scales), kDField = offsetof(BlockQ6_K, d);
    // scale = lanes / 8 (every region grows with the lane count), half = which 8 rows of a 16-row group.
    static void repack(const uint8_t* blocks, const int32_t o[8], __m256i offs, uint8_t* dst, int scale = 1, int half = 0) {
        auto at = [&](size_t off) { return dst + off * scale + 32 * half; };
        const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x30);
        for (int h = 0; h < 2; ++h) {
            __m256i u[4][8], t[8];
            for (int r = 0; r < 8; ++r) {
                const uint8_t* b = blocks + o[r];
                const __m256i ql0 = loadu(b + kQl + 64 * h), ql1 = loadu(b + kQl + 64 * h + 32),
                              qh = loadu(b + kQh + 32 * h);
                u[0][r] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
                u[1][r] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
                u[2][r] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m2));
                u[3][r] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                          _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
            }
            for (int k = 0; k < 4; ++k) {  // values 128h + 32k .. : sub-blocks 8h + 2k and 8h + 2k + 1
                transpose8(u[k], t);
                for (int c = 0; c < 8; ++c)
                    _mm256_store_si256(reinterpret_cast<__m256i*>(at(256 * (4 * h + k) + 32 * c)), t[c]);
            }
        }
        auto st = [&](size_t off, __m256i v) { _mm256_store_si256(reinterpret_cast<__m256i*>(at(off)), v); };
        for (int i = 0; i < 4; ++i) {
            const __m256i w = gather32(blocks + kScales + 4 * i, offs);
            __m256i s[4];
            for (int e = 0; e < 4; ++e) {
                s[e] = sbyte_of(w, e);
                st(kSc + 32 * (4 * i + e), s[e]);
            }
            st(kScP + 32 * (2 * i), pack16x2(s[0], s[1]));
            st(kScP + 32 * (2 * i + 1), pack16x2(s[2], s[3]));
        }
        // d is the last 2 bytes of the block: read the word that ends there.
        const __m256i dw = gather32(blocks + kDField - 2, offs);
        _mm256_store_ps(reinterpret_cast<float*>(at(kD)), _mm256_cvtph_ps(low16(_mm256_srli_epi32(dw, 16))));
    }
};

struct TokenActsK {
    const int8_t* qs;
    const float* d;
    const int16_t* bsums;
    const int16_t* bsums32;
};
inline TokenActsK token_acts_k(const GemmActs& a, int64_t t, int64_t nb) {
    return {a.qs + t * nb * QK_K, a.d + t * nb, a.bsums + t * nb * 16, a.bsums32 + t * nb * 8};
}

// One repacked super-block (p) of G row groups x N tokens into the accumulators.
template <class F, int G, int N>
__attribute__((always_inline)) inline void kblock(const uint8_t* p, size_t gstride, const TokenActsK* ya, int64_t b,
                                                 __m256 (&acc)[G][N]) {
    constexpr bool kQ4 = std::is_same<F, FQ4K>::value;
    constexpr int kSub = kQ4 ? 8 : 16, kChunks = kQ4 ? 8 : 4;  // sub-blocks, 4-value chunks per sub-block
    __m256i is[G][N];
    for (int g = 0; g < G; ++g)
        for (int j = 0; j < N; ++j) is[g][j] = _mm256_setzero_si256();
    for (int s = 0; s < kSub; ++s) {
        __m256i dot[G][N];
        for (int g = 0; g < G; ++g)
            for (int j = 0; j < N; ++j) dot[g][j] = _mm256_setzero_si256();
        for (int c = 0; c < kChunks; ++c) {
            __m256i wv[G];
            for (int g = 0; g < G; ++g)
                wv[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + g * gstride + 32 * (kChunks * s + c)));
            for (int j = 0; j < N; ++j) {
                const __m256i yb = bcast32(ya[j].qs + b * QK_K + kChunks * 4 * s + 4 * c);
                for (int g = 0; g < G; ++g) dot[g][j] = idot<false>(dot[g][j], wv[g], yb);
            }
        }
        for (int g = 0; g < G; ++g) {
            const __m256i sc = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + g * gstride + F::kSc + 32 * s));
            for (int j = 0; j < N; ++j) is[g][j] = _mm256_add_epi32(is[g][j], _mm256_mullo_epi32(dot[g][j], sc));
        }
    }
    for (int g = 0; g < G; ++g) {
        const uint8_t* pg = p + g * gstride;
        const __m256 dv = _mm256_load_ps(reinterpret_cast<const float*>(pg + F::kD));
        if constexpr (kQ4) {
            // mins: sum_s mn[s] * (32-value activation sums), as int16 pairs
            const __m256 dmv = _mm256_load_ps(reinterpret_cast<const float*>(pg + F::kDm));
            for (int j = 0; j < N; ++j) {
                __m256i ms = _mm256_setzero_si256();
                for (int q = 0; q < 4; ++q)
                    ms = _mm256_add_epi32(ms, _mm256_madd_epi16(
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(pg + F::kMn + 32 * q)),
                        bcast32(ya[j].bsums32 + b * 8 + 2 * q)));
                const __m256 dy = _mm256_set1_ps(ya[j].d[b]);
                acc[g][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[g][j]), _mm256_mul_ps(dv, dy), acc[g][j]);
                acc[g][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_setzero_si256(), ms)),
                                            _mm256_mul_ps(dmv, dy), acc[g][j]);
            }
        } else {
            // offset 32: subtract 32 * sum_g sc[g] * (16-value activation sums)
            for (int j = 0; j < N; ++j) {
                __m256i cs = _mm256_setzero_si256();
                for (int q = 0; q < 8; ++q)
                    cs = _mm256_add_epi32(cs, _mm256_madd_epi16(
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(pg + F::kScP + 32 * q)),
                        bcast32(ya[j].bsums + b * 16 + 2 * q)));
                const __m256i isum = _mm256_sub_epi32(is[g][j], _mm256_slli_epi32(cs, 5));
                acc[g][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dv, _mm256_set1_ps(ya[j].d[b])),
                                            acc[g][j]);
            }
        }
    }
}

template <class F, int G, int N>
void kstore(const __m256 (&acc)[G][N], int64_t t0, float* y, int64_t ldy, int64_t row0, int n_rows,
            const float* bias) {
    for (int j = 0; j < N; ++j)
        for (int g = 0; g < G; ++g) {
            const int n = n_rows - 8 * g;
            if (n > 0)
                store_rows(y + (t0 + j) * ldy + row0 + 8 * g, bias ? bias + row0 + 8 * g : nullptr, n, acc[g][j]);
        }
}

// G groups of 8 rows repacked for the whole row (pk, gstride bytes apart) x N tokens from t0.
template <class F, int G, int N>
void ktile(const uint8_t* pk, size_t gstride, int64_t nb, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
           int64_t row0, int n_rows, const float* bias) {
    TokenActsK ya[N];
    for (int j = 0; j < N; ++j) ya[j] = token_acts_k(a, t0 + j, nb);
    __m256 acc[G][N];
    for (int g = 0; g < G; ++g)
        for (int j = 0; j < N; ++j) acc[g][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) kblock<F, G, N>(pk + b * F::kPack, gstride, ya, b, acc);
    kstore<F, G, N>(acc, t0, y, ldy, row0, n_rows, bias);
}

inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

// Integer sum (scaled by the sub-block scales) of one K-quant block against N tokens' block b.
// maddubs + madd are exact here: nibbles or 6-bit values times int8 stay within int16 pairs.
template <class F, int N>
inline void krow_block(const uint8_t* x, const TokenActsK* ya, int64_t b, int out[N]) {
    constexpr bool kQ4 = std::is_same<F, FQ4K>::value;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i rs[N];
    for (int j = 0; j < N; ++j) rs[j] = _mm256_setzero_si256();
    if constexpr (kQ4) {
        // the 8 scales as int16, in both 128-bit halves; word pair (2c, 2c+1) picked per chunk
        const uint32_t w0 = load_u32(x + FQ4K::kScales), w2 = load_u32(x + FQ4K::kScales + 8);
        const uint32_t sc_lo = w0 & 0x3f3f3f3fu, sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u);
        const __m256i sc16 = _mm256_broadcastsi128_si256(
            _mm_cvtepu8_epi16(_mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), 0, 0)));
        for (int c = 0; c < 4; ++c) {
            const __m256i q = loadu(x + FQ4K::kQs + 32 * c);
            const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i s0 = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(static_cast<short>(0x0100 * (4 * c + 1) + 4 * c)));
            const __m256i s1 = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(static_cast<short>(0x0100 * (4 * c + 3) + 4 * c + 2)));
            for (int j = 0; j < N; ++j) {
                const int8_t* yq = ya[j].qs + b * QK_K + 64 * c;
                rs[j] = _mm256_add_epi32(rs[j], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, loadu(yq)), s0));
                rs[j] = _mm256_add_epi32(rs[j], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, loadu(yq + 32)), s1));
            }
        }
    } else {
        const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + FQ6K::kScales)));
        const __m256i m2 = _mm256_set1_epi8(0x30);
        for (int hh = 0; hh < 2; ++hh) {
            // scales 8hh .. 8hh + 7 in both halves; value vector k pairs sub-blocks 8hh + 2k | + 1
            const __m256i sh = hh ? _mm256_permute2x128_si256(s16, s16, 0x11) : _mm256_permute2x128_si256(s16, s16, 0x00);
            const __m256i ql0 = loadu(x + FQ6K::kQl + 64 * hh), ql1 = loadu(x + FQ6K::kQl + 64 * hh + 32),
                          qh = loadu(x + FQ6K::kQh + 32 * hh);
            __m256i u[4];
            u[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
            u[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
            u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m2));
            u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
            for (int k = 0; k < 4; ++k) {
                const short lo_sel = static_cast<short>(0x0100 * (4 * k + 1) + 4 * k);
                const short hi_sel = static_cast<short>(0x0100 * (4 * k + 3) + 4 * k + 2);
                const __m256i sel = _mm256_setr_epi16(lo_sel, lo_sel, lo_sel, lo_sel, lo_sel, lo_sel, lo_sel, lo_sel,
                                                      hi_sel, hi_sel, hi_sel, hi_sel, hi_sel, hi_sel, hi_sel, hi_sel);
                const __m256i sk = _mm256_shuffle_epi8(sh, sel);
                for (int j = 0; j < N; ++j) {
                    const __m256i p = _mm256_maddubs_epi16(u[k], loadu(ya[j].qs + b * QK_K + 128 * hh + 32 * k));
                    rs[j] = _mm256_add_epi32(rs[j], _mm256_madd_epi16(p, sk));
                }
            }
        }
        // the +32 offset: subtract 32 * sum_g sc[g] * (16-value activation sums)
        for (int j = 0; j < N; ++j)
            rs[j] = _mm256_sub_epi32(rs[j], _mm256_slli_epi32(_mm256_madd_epi16(s16, loadu(ya[j].bsums + b * 16)), 5));
    }
    for (int j = 0; j < N; ++j) out[j] = hsum_i32(rs[j]);
}

// Few tokens: each of 8 rows is dotted block by block in its own layout (one sequential stream,
// as vec_dot reads it), the block sums land in [token][block][row], and then the float steps of
// kblock run on the 8 row lanes.
template <class F, int N>
void kfold(const uint8_t* w, size_t stride, int n_rows, int64_t nb, const GemmActs& a, int64_t t0, float* y,
           int64_t ldy, int64_t row0, const float* bias, const uint8_t* next = nullptr, size_t next_bytes = 0) {
    constexpr bool kQ4 = std::is_same<F, FQ4K>::value;
    const GroupPrefetch pf(next, next ? next_bytes : 0, 8 * nb);
    alignas(32) int32_t o[8];
    for (int r = 0; r < 8; ++r) o[r] = static_cast<int32_t>(static_cast<size_t>(std::min(r, n_rows - 1)) * stride);
    const __m256i offs = _mm256_load_si256(reinterpret_cast<const __m256i*>(o));
    TokenActsK ya[N];
    for (int j = 0; j < N; ++j) ya[j] = token_acts_k(a, t0 + j, nb);
    thread_local std::vector<int32_t> sums;
    if (sums.size() < static_cast<size_t>(N * nb * 8 + 8)) sums.resize(static_cast<size_t>(N * nb * 8 + 8));
    int32_t* sb = sums.data();
    for (int r = 0; r < 8; ++r) {
        if (r >= n_rows) {
            for (int64_t b = 0; b < nb; ++b)
                for (int j = 0; j < N; ++j) sb[(j * nb + b) * 8 + r] = 0;
            continue;
        }
        const uint8_t* x = w + static_cast<size_t>(r) * stride;
        for (int64_t b = 0; b < nb; ++b) {
            pf.step(r * nb + b);
            int v[N];
            krow_block<F, N>(x + b * F::kBytes, ya, b, v);
            for (int j = 0; j < N; ++j) sb[(j * nb + b) * 8 + r] = v[j];
        }
    }
    __m256 acc[N];
    for (int j = 0; j < N; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blocks = w + b * F::kBytes;
        const __m256i dm = gather32(blocks + (kQ4 ? offsetof(BlockQ4_K, d) : FQ6K::kDField - 2), offs);
        if constexpr (kQ4) {
            const __m256 dv = _mm256_cvtph_ps(low16(dm)), dmv = _mm256_cvtph_ps(low16(_mm256_srli_epi32(dm, 16)));
            const __m256i w1 = gather32(blocks + FQ4K::kScales + 4, offs), w2 = gather32(blocks + FQ4K::kScales + 8, offs);
            const __m256i mn_lo = _mm256_and_si256(w1, _mm256_set1_epi32(0x3f3f3f3f));
            const __m256i mn_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(w2, 4), _mm256_set1_epi32(0x0f0f0f0f)),
                                                  _mm256_and_si256(_mm256_srli_epi32(w1, 2), _mm256_set1_epi32(0x30303030)));
            const __m256i mn[4] = {pack16x2(byte_of(mn_lo, 0), byte_of(mn_lo, 1)), pack16x2(byte_of(mn_lo, 2), byte_of(mn_lo, 3)),
                                   pack16x2(byte_of(mn_hi, 0), byte_of(mn_hi, 1)), pack16x2(byte_of(mn_hi, 2), byte_of(mn_hi, 3))};
            for (int j = 0; j < N; ++j) {
                const __m256i is = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + (j * nb + b) * 8));
                __m256i ms = _mm256_setzero_si256();
                for (int q = 0; q < 4; ++q)
                    ms = _mm256_add_epi32(ms, _mm256_madd_epi16(mn[q], bcast32(ya[j].bsums32 + b * 8 + 2 * q)));
                const __m256 dy = _mm256_set1_ps(ya[j].d[b]);
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_mul_ps(dv, dy), acc[j]);
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_setzero_si256(), ms)),
                                         _mm256_mul_ps(dmv, dy), acc[j]);
            }
        } else {
            const __m256 dv = _mm256_cvtph_ps(low16(_mm256_srli_epi32(dm, 16)));
            for (int j = 0; j < N; ++j) {
                const __m256i is = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + (j * nb + b) * 8));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_mul_ps(dv, _mm256_set1_ps(ya[j].d[b])), acc[j]);
            }
        }
    }
    for (int j = 0; j < N; ++j) store_rows(y + (t0 + j) * ldy + row0, bias ? bias + row0 : nullptr, n_rows, acc[j]);
}

template <class F>
void krepack8(const uint8_t* w, size_t stride, int n, int64_t nb, uint8_t* dst) {
    alignas(32) int32_t o[8];
    for (int r = 0; r < 8; ++r) o[r] = static_cast<int32_t>(static_cast<size_t>(std::min(r, n - 1)) * stride);
    const __m256i offs = _mm256_load_si256(reinterpret_cast<const __m256i*>(o));
    for (int64_t b = 0; b < nb; ++b) F::repack(w + b * F::kBytes, o, offs, dst + b * F::kPack);
}

// Tiles of 16 rows x 2 tokens (three live vectors per output: sum, sub-block dot, float acc).
constexpr int kKN = 2;

#if defined(X2L_GEMM_ZQ)
// ---- AVX-512 K-quant tile: 16-row groups (the repack layout at twice the width), same lane steps.
template <class F, int G, int N>
void zktile(const uint8_t* pk, size_t gstride, int64_t nb, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
            int64_t row0, int n_rows, const float* bias) {
    constexpr bool kQ4 = std::is_same<F, FQ4K>::value;
    constexpr int kSub = kQ4 ? 8 : 16, kChunks = kQ4 ? 8 : 4;
    TokenActsK ya[N];
    for (int j = 0; j < N; ++j) ya[j] = token_acts_k(a, t0 + j, nb);
    __m512 acc[G][N];
    for (int g = 0; g < G; ++g)
        for (int j = 0; j < N; ++j) acc[g][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = pk + b * 2 * F::kPack;
        __m512i is[G][N];
        for (int g = 0; g < G; ++g)
            for (int j = 0; j < N; ++j) is[g][j] = _mm512_setzero_si512();
        for (int s = 0; s < kSub; ++s) {
            __m512i dot[G][N];
            for (int g = 0; g < G; ++g)
                for (int j = 0; j < N; ++j) dot[g][j] = _mm512_setzero_si512();
            for (int c = 0; c < kChunks; ++c) {
                __m512i wv[G];
                for (int g = 0; g < G; ++g) wv[g] = _mm512_load_si512(p + g * gstride + 64 * (kChunks * s + c));
                for (int j = 0; j < N; ++j) {
                    const __m512i yb = zbcast32(ya[j].qs + b * QK_K + kChunks * 4 * s + 4 * c);
                    for (int g = 0; g < G; ++g) dot[g][j] = _mm512_dpbusd_epi32(dot[g][j], wv[g], yb);
                }
            }
            for (int g = 0; g < G; ++g) {
                const __m512i sc = _mm512_load_si512(p + g * gstride + 2 * F::kSc + 64 * s);
                for (int j = 0; j < N; ++j) is[g][j] = _mm512_add_epi32(is[g][j], _mm512_mullo_epi32(dot[g][j], sc));
            }
        }
        for (int g = 0; g < G; ++g) {
            const uint8_t* pg = p + g * gstride;
            const __m512 dv = _mm512_load_ps(pg + 2 * F::kD);
            if constexpr (kQ4) {
                const __m512 dmv = _mm512_load_ps(pg + 2 * F::kDm);
                for (int j = 0; j < N; ++j) {
                    __m512i ms = _mm512_setzero_si512();
                    for (int q = 0; q < 4; ++q)
                        ms = _mm512_add_epi32(ms, _mm512_madd_epi16(_mm512_load_si512(pg + 2 * F::kMn + 64 * q),
                                                                    zbcast32(ya[j].bsums32 + b * 8 + 2 * q)));
                    const __m512 dy = _mm512_set1_ps(ya[j].d[b]);
                    acc[g][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[g][j]), _mm512_mul_ps(dv, dy), acc[g][j]);
                    acc[g][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_setzero_si512(), ms)),
                                                _mm512_mul_ps(dmv, dy), acc[g][j]);
                }
            } else {
                for (int j = 0; j < N; ++j) {
                    __m512i cs = _mm512_setzero_si512();
                    for (int q = 0; q < 8; ++q)
                        cs = _mm512_add_epi32(cs, _mm512_madd_epi16(_mm512_load_si512(pg + 2 * F::kScP + 64 * q),
                                                                    zbcast32(ya[j].bsums + b * 16 + 2 * q)));
                    const __m512i isum = _mm512_sub_epi32(is[g][j], _mm512_slli_epi32(cs, 5));
                    acc[g][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dv, _mm512_set1_ps(ya[j].d[b])),
                                                acc[g][j]);
                }
            }
        }
    }
    for (int j = 0; j < N; ++j)
        for (int g = 0; g < G; ++g) {
            const int n = n_rows - 16 * g;
            if (n <= 0) continue;
            const __mmask16 m = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
            const float* bg = bias ? bias + row0 + 16 * g : nullptr;
            __m512 v = acc[g][j];
            if (bg) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bg));
            _mm512_mask_storeu_ps(y + (t0 + j) * ldy + row0 + 16 * g, m, v);
        }
}

constexpr int kZKN = 4;  // 16 or 32 rows x 4 tokens (measured best of 2..4)

template <class F, int G>
void zktile_n(int n, const uint8_t* pk, size_t gstride, int64_t nb, const GemmActs& a, int64_t t0, float* y,
              int64_t ldy, int64_t row0, int n_rows, const float* bias) {
    switch (n) {
        case 1: return zktile<F, G, 1>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
        case 2: return zktile<F, G, 2>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
        case 3: return zktile<F, G, 3>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
        default: return zktile<F, G, kZKN>(pk, gstride, nb, a, t0, y, ldy, row0, n_rows, bias);
    }
}

template <class F>
void krepack16(const uint8_t* w, size_t stride, int n, int64_t nb, uint8_t* dst) {
    alignas(32) int32_t o[16];
    for (int r = 0; r < 16; ++r) o[r] = static_cast<int32_t>(static_cast<size_t>(std::min(r, n - 1)) * stride);
    const __m256i offs[2] = {_mm256_load_si256(reinterpret_cast<const __m256i*>(o)),
                             _mm256_load_si256(reinterpret_cast<const __m256i*>(o + 8))};
    for (int64_t b = 0; b < nb; ++b)
        for (int h = 0; h < 2; ++h) F::repack(w + b * F::kBytes, o + 8 * h, offs[h], dst + b * 2 * F::kPack, 2, h);
}

// 32 rows (two halves repacked at twice the 8-lane layout's width) x kZKN tokens.
template <class F>
struct KZmm : TwoHalves<KZmm<F>> {
    static constexpr int kL = 16, kTokens = kZKN;
    static int64_t token_block(int64_t) { return kQTokBlock; }
    static size_t half_bytes(int64_t n_in) { return static_cast<size_t>(n_in / QK_K) * 2 * F::kPack; }
    static void repack(const uint8_t* w, size_t stride, int n, int64_t n_in, uint8_t* dst) {
        krepack16<F>(w, stride, n, n_in / QK_K, dst);
    }
    template <int G>
    static void tile_g(int nt, const uint8_t* pk, size_t gstride, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                       int64_t row0, int n_rows, const float* bias) {
        zktile_n<F, G>(nt, pk, gstride, a.n_in / QK_K, a, t0, y, ldy, row0, n_rows, bias);
    }
};
#endif  // X2L_GEMM_ZQ

// 16 rows (two 8-lane halves) x kKN tokens.
template <class F>
struct KYmm : TwoHalves<KYmm<F>> {
    static constexpr int kL = 8, kTokens = kKN;
    static int64_t token_block(int64_t) { return kQTokBlock; }
    static size_t half_bytes(int64_t n_in) { return static_cast<size_t>(n_in / QK_K) * F::kPack; }
    static void repack(const uint8_t* w, size_t stride, int n, int64_t n_in, uint8_t* dst) {
        krepack8<F>(w, stride, n, n_in / QK_K, dst);
    }
    template <int G>
    static void tile_g(int nt, const uint8_t* pk, size_t gstride, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                       int64_t row0, int n_rows, const float* bias) {
        if (nt == kKN) ktile<F, G, kKN>(pk, gstride, a.n_in / QK_K, a, t0, y, ldy, row0, n_rows, bias);
        else ktile<F, G, 1>(pk, gstride, a.n_in / QK_K, a, t0, y, ldy, row0, n_rows, bias);
    }
};

template <class F>
void kgemm(const uint8_t* w, size_t stride, int64_t r0, int64_t r1, const GemmActs& a, float* y, int64_t ldy,
           const float* bias) {
    const int64_t nb = a.n_in / QK_K, T = a.n_tokens;
    if (T < kMinPackTokens) {
        for (int64_t r = r0; r < r1; r += 8) {
            const int n = static_cast<int>(std::min<int64_t>(8, r1 - r));
            const int64_t n_next = std::min<int64_t>(8, r1 - r - n);
            kfold<F, 1>(w + static_cast<size_t>(r) * stride, stride, n, nb, a, 0, y, ldy, r, bias,
                        w + static_cast<size_t>(r + n) * stride, static_cast<size_t>(std::max<int64_t>(0, n_next)) * stride);
        }
        return;
    }
#if defined(X2L_GEMM_ZQ)
    return tiled_gemm<KZmm<F>>(w, stride, r0, r1, a, y, ldy, bias);
#else
    return tiled_gemm<KYmm<F>>(w, stride, r0, r1, a, y, ldy, bias);
#endif
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


#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && !defined(X2L_NO_ZMM)
// ---- float weights, AVX-512: one zmm holds the 8-lane accumulators of two rows (a 256-bit
// half each) and the activation chunk is broadcast to both halves, so every lane does exactly
// the fma sequence of the 256-bit kernels at twice the width. Rows are converted to float once
// per panel, pair-interleaved: [pair][k / 8][row 2p: 8 | row 2p + 1: 8], zero-padded.
#define X2L_GEMM_ZMM 1

template <class L>
void zpack(const uint8_t* w, size_t stride, int64_t n_rows, int64_t K, float* dst) {
    const int64_t nk = (K + 7) / 8, K8 = K & ~static_cast<int64_t>(7);
    for (int64_t p = 0; p < (n_rows + 1) / 2; ++p) {
        for (int h = 0; h < 2; ++h) {
            const int64_t r = 2 * p + h;
            float* d = dst + p * nk * 16 + 8 * h;
            if (r >= n_rows) {
                for (int64_t s = 0; s < nk; ++s) _mm256_store_ps(d + 16 * s, _mm256_setzero_ps());
                continue;
            }
            const uint8_t* row = w + static_cast<size_t>(r) * stride;
            int64_t s = 0;
            for (; 8 * s < K8; ++s) _mm256_store_ps(d + 16 * s, L::load(row, 8 * s));
            if (K8 < K) _mm256_store_ps(d + 16 * s, L::load_tail(row, K8, static_cast<int>(K - K8)));
        }
    }
}

// RP row pairs x RN tokens from a packed panel (pair p at wp + p * nk * 16).
template <int RP, int RN>
void ztile(const float* wp, int64_t nk, const float* x, int64_t K, float* y, int64_t ldy, int n_rows,
           const float* bias) {
    __m512 acc[RP][RN];
    for (int p = 0; p < RP; ++p)
        for (int j = 0; j < RN; ++j) acc[p][j] = _mm512_setzero_ps();
    const int64_t K8 = K & ~static_cast<int64_t>(7);
    int64_t s = 0;
    for (; 8 * s < K8; ++s) {
        __m512 wv[RP];
        for (int p = 0; p < RP; ++p) wv[p] = _mm512_load_ps(wp + (p * nk + s) * 16);
        for (int j = 0; j < RN; ++j) {
            const __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + j * K + 8 * s));
            for (int p = 0; p < RP; ++p) acc[p][j] = _mm512_fmadd_ps(wv[p], xv, acc[p][j]);
        }
    }
    if (K8 < K) {
        const __mmask8 m = static_cast<__mmask8>((1u << (K - K8)) - 1u);
        __m512 wv[RP];
        for (int p = 0; p < RP; ++p) wv[p] = _mm512_load_ps(wp + (p * nk + s) * 16);
        for (int j = 0; j < RN; ++j) {
            const __m512 xv = _mm512_broadcast_f32x8(_mm256_maskz_loadu_ps(m, x + j * K + K8));
            for (int p = 0; p < RP; ++p) acc[p][j] = _mm512_fmadd_ps(wv[p], xv, acc[p][j]);
        }
    }
    // outputs in [token][row] order: row 2p is the low half of acc[p][j], row 2p + 1 the high half
    constexpr int kOut = 2 * RP * RN;
    __m256 h[kOut];
    for (int j = 0; j < RN; ++j)
        for (int p = 0; p < RP; ++p) {
            h[j * 2 * RP + 2 * p] = _mm512_castps512_ps256(acc[p][j]);
            h[j * 2 * RP + 2 * p + 1] = _mm512_extractf32x8_ps(acc[p][j], 1);
        }
    alignas(32) float out[kOut + 8] = {};
    constexpr int kFull = kOut / 8 * 8;
    for (int o = 0; o < kFull; o += 8) _mm256_store_ps(out + o, hsum8x8(h + o));
    for (int o = kFull; o < kOut; ++o) out[o] = hsum8(h[o]);
    for (int j = 0; j < RN; ++j)
        for (int i = 0; i < n_rows; ++i) {
            const float v = out[j * 2 * RP + i];
            y[j * ldy + i] = bias ? v + bias[i] : v;
        }
}

constexpr int kZP = 3, kZN = 6;  // 6 rows x 6 tokens: 18 zmm accumulators

template <int RP>
void ztile_n(int n, const float* wp, int64_t nk, const float* x, int64_t K, float* y, int64_t ldy, int n_rows,
             const float* bias) {
    switch (n) {
        case 1: return ztile<RP, 1>(wp, nk, x, K, y, ldy, n_rows, bias);
        case 2: return ztile<RP, 2>(wp, nk, x, K, y, ldy, n_rows, bias);
        case 3: return ztile<RP, 3>(wp, nk, x, K, y, ldy, n_rows, bias);
        case 4: return ztile<RP, 4>(wp, nk, x, K, y, ldy, n_rows, bias);
        case 5: return ztile<RP, 5>(wp, nk, x, K, y, ldy, n_rows, bias);
        default: return ztile<RP, kZN>(wp, nk, x, K, y, ldy, n_rows, bias);
    }
}

// Panels of whole 6-row tiles, ~512 KB as floats (they stay in L2 while every token tile passes),
// converted once (zpack) and run as 6 rows x kZN tokens.
template <class L>
struct FloatZmm {
    static constexpr int kTileRows = 2 * kZP, kTokens = kZN;
    static int64_t nk(int64_t n_in) { return (n_in + 7) / 8; }
    static int64_t group_rows(int64_t n_in, size_t) {
        return std::max<int64_t>(kTileRows, (static_cast<int64_t>(512 << 10) / (nk(n_in) * 32)) / kTileRows * kTileRows);
    }
    static int64_t token_block(int64_t n_tokens) { return n_tokens; }
    static size_t pack_bytes(int64_t n_in) {
        return static_cast<size_t>(group_rows(n_in, 0) / 2 * nk(n_in) * 16) * sizeof(float);
    }
    static void pack(const uint8_t* w, size_t stride, int n, int64_t n_in, uint8_t* dst) {
        zpack<L>(w, stride, n, n_in, reinterpret_cast<float*>(dst));
    }
    static void tile(const uint8_t* pk, size_t, int nt, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                     int64_t row0, int n_rows, const float* bias) {
        const int64_t K = a.n_in, n_k = nk(K);
        const float* x = a.x + t0 * K;
        for (int r = 0; r < n_rows; r += kTileRows) {
            const int m = std::min(kTileRows, n_rows - r);
            const float* wt = reinterpret_cast<const float*>(pk) + (r / 2) * n_k * 16;
            float* yt = y + t0 * ldy + row0 + r;
            const float* bt = bias ? bias + row0 + r : nullptr;
            if (m > 4) ztile_n<3>(nt, wt, n_k, x, K, yt, ldy, m, bt);
            else if (m > 2) ztile_n<2>(nt, wt, n_k, x, K, yt, ldy, m, bt);
            else ztile_n<1>(nt, wt, n_k, x, K, yt, ldy, m, bt);
        }
    }
};
#endif  // AVX-512

// Row panels of ~256 KB read in place (they stay in L2 while the token tiles, in L1, pass over
// them), as kFM rows x kFN tokens.
template <class L>
struct FloatYmm {
    static constexpr int kTokens = kFN;
    static int64_t group_rows(int64_t, size_t stride) {
        return std::max<int64_t>(kFM, (static_cast<int64_t>(256 << 10) / static_cast<int64_t>(stride)) & ~3);
    }
    static int64_t token_block(int64_t n_tokens) { return n_tokens; }
    static size_t pack_bytes(int64_t) { return 0; }
    static void pack(const uint8_t*, size_t, int, int64_t, uint8_t*) {}
    static void tile(const uint8_t* rows, size_t stride, int nt, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                     int64_t row0, int n_rows, const float* bias) {
        const int64_t K = a.n_in;
        for (int r = 0; r < n_rows; r += kFM) {
            const int m = std::min(kFM, n_rows - r);
            ftile_mn<L>(m, nt, rows + static_cast<size_t>(r) * stride, stride, a.x + t0 * K, K, y + t0 * ldy + row0 + r,
                        ldy, bias ? bias + row0 + r : nullptr);
        }
    }
};

// Below this many tokens the float panel conversion does not pay for itself.
constexpr int64_t kMinZTokens = 12;  // measured crossover

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
#if defined(X2L_GEMM_ZMM)
    if (T >= kMinZTokens) return tiled_gemm<FloatZmm<L>>(w, stride, r0, r1, a, y, ldy, bias);
#endif
    return tiled_gemm<FloatYmm<L>>(w, stride, r0, r1, a, y, ldy, bias);
}

}  // namespace
#endif  // X2L_GEMM_AVX2


// ------------------------------------------------------------------------------ 5. NEON
#if defined(X2L_GEMM_NEON)
namespace {

// ---- float weights: RM rows x RN tokens, each output's 8 lanes in two float32x4.
struct NF32 {
    static void load(const uint8_t* row, int64_t k, float32x4_t& lo, float32x4_t& hi) {
        const float* p = reinterpret_cast<const float*>(row) + k;
        lo = vld1q_f32(p);
        hi = vld1q_f32(p + 4);
    }
    static void load_tail(const uint8_t* row, int64_t k, int n, float32x4_t& lo, float32x4_t& hi) {
        float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(t, reinterpret_cast<const float*>(row) + k, static_cast<size_t>(n) * 4);
        lo = vld1q_f32(t);
        hi = vld1q_f32(t + 4);
    }
};
struct NF16 {
    static void widen(uint16x8_t h, float32x4_t& lo, float32x4_t& hi) {
        const float16x8_t f = vreinterpretq_f16_u16(h);
        lo = vcvt_f32_f16(vget_low_f16(f));
        hi = vcvt_high_f32_f16(f);
    }
    static void load(const uint8_t* row, int64_t k, float32x4_t& lo, float32x4_t& hi) {
        widen(vld1q_u16(reinterpret_cast<const uint16_t*>(row) + k), lo, hi);
    }
    static void load_tail(const uint8_t* row, int64_t k, int n, float32x4_t& lo, float32x4_t& hi) {
        uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(t, row + 2 * k, static_cast<size_t>(n) * 2);
        widen(vld1q_u16(t), lo, hi);
    }
};
struct NBF16 {
    static void widen(uint16x8_t h, float32x4_t& lo, float32x4_t& hi) {
        lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
        hi = vreinterpretq_f32_u32(vshll_high_n_u16(h, 16));
    }
    static void load(const uint8_t* row, int64_t k, float32x4_t& lo, float32x4_t& hi) {
        widen(vld1q_u16(reinterpret_cast<const uint16_t*>(row) + k), lo, hi);
    }
    static void load_tail(const uint8_t* row, int64_t k, int n, float32x4_t& lo, float32x4_t& hi) {
        uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(t, row + 2 * k, static_cast<size_t>(n) * 2);
        widen(vld1q_u16(t), lo, hi);
    }
};

// ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
inline float nsum8(float32x4_t lo, float32x4_t hi) {
    const float32x4_t a = vpaddq_f32(lo, hi);  // s0+s1, s2+s3, s4+s5, s6+s7
    const float32x4_t b = vpaddq_f32(a, a);
    return vgetq_lane_f32(b, 0) + vgetq_lane_f32(b, 1);
}

template <class L, int RM, int RN>
void ntile(const uint8_t* w, size_t stride, const float* x, int64_t K, float* y, int64_t ldy, const float* bias) {
    float32x4_t lo[RM * RN], hi[RM * RN];
    for (int i = 0; i < RM * RN; ++i) lo[i] = hi[i] = vdupq_n_f32(0.0f);
    const int64_t K8 = K & ~static_cast<int64_t>(7);
    for (int64_t k = 0; k < K8; k += 8) {
        float32x4_t wl[RM], wh[RM];
        for (int i = 0; i < RM; ++i) L::load(w + i * stride, k, wl[i], wh[i]);
        for (int j = 0; j < RN; ++j) {
            const float32x4_t xl = vld1q_f32(x + j * K + k), xh = vld1q_f32(x + j * K + k + 4);
            for (int i = 0; i < RM; ++i) {
                lo[j * RM + i] = vfmaq_f32(lo[j * RM + i], wl[i], xl);
                hi[j * RM + i] = vfmaq_f32(hi[j * RM + i], wh[i], xh);
            }
        }
    }
    if (K8 < K) {
        const int n = static_cast<int>(K - K8);
        float32x4_t wl[RM], wh[RM];
        for (int i = 0; i < RM; ++i) L::load_tail(w + i * stride, K8, n, wl[i], wh[i]);
        for (int j = 0; j < RN; ++j) {
            float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            std::memcpy(t, x + j * K + K8, static_cast<size_t>(n) * 4);
            const float32x4_t xl = vld1q_f32(t), xh = vld1q_f32(t + 4);
            for (int i = 0; i < RM; ++i) {
                lo[j * RM + i] = vfmaq_f32(lo[j * RM + i], wl[i], xl);
                hi[j * RM + i] = vfmaq_f32(hi[j * RM + i], wh[i], xh);
            }
        }
    }
    for (int j = 0; j < RN; ++j)
        for (int i = 0; i < RM; ++i) {
            const float v = nsum8(lo[j * RM + i], hi[j * RM + i]);
            y[j * ldy + i] = bias ? v + bias[i] : v;
        }
}

constexpr int kNM = 4, kNN = 2;  // 16 accumulator registers + 8 weight + 2 activation

template <class L, int RN>
void ntile_m(int m, const uint8_t* w, size_t stride, const float* x, int64_t K, float* y, int64_t ldy,
             const float* bias) {
    switch (m) {
        case 1: return ntile<L, 1, RN>(w, stride, x, K, y, ldy, bias);
        case 2: return ntile<L, 2, RN>(w, stride, x, K, y, ldy, bias);
        case 3: return ntile<L, 3, RN>(w, stride, x, K, y, ldy, bias);
        default: return ntile<L, kNM, RN>(w, stride, x, K, y, ldy, bias);
    }
}

// Row panels of ~256 KB read in place, kNM rows x kNN tokens.
template <class L>
struct FloatNeon {
    static constexpr int kTokens = kNN;
    static int64_t group_rows(int64_t, size_t stride) {
        return std::max<int64_t>(kNM, (static_cast<int64_t>(256 << 10) / static_cast<int64_t>(stride)) & ~3);
    }
    static int64_t token_block(int64_t n_tokens) { return n_tokens; }
    static size_t pack_bytes(int64_t) { return 0; }
    static void pack(const uint8_t*, size_t, int, int64_t, uint8_t*) {}
    static void tile(const uint8_t* rows, size_t stride, int nt, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                     int64_t row0, int n_rows, const float* bias) {
        const int64_t K = a.n_in;
        for (int r = 0; r < n_rows; r += kNM) {
            const int m = std::min(kNM, n_rows - r);
            const uint8_t* wr = rows + static_cast<size_t>(r) * stride;
            float* yt = y + t0 * ldy + row0 + r;
            const float* bt = bias ? bias + row0 + r : nullptr;
            if (nt == kNN) ntile_m<L, kNN>(m, wr, stride, a.x + t0 * K, K, yt, ldy, bt);
            else ntile_m<L, 1>(m, wr, stride, a.x + t0 * K, K, yt, ldy, bt);
        }
    }
};

// ---- 32-value formats: 4 rows x N tokens. Each row block is unpacked to its signed values,
// dotted with the token's block (sdot, exact), the 4 rows' sums folded into the lanes of one
// vector with addp, then the float steps of the reference on those 4 lanes.
inline int32x4_t ndot(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
#endif
}

// Bytes whose bit j (of 16 bits from `bits`) is set become 16: the 5th bit of Q5 values.
inline int8x16_t nbit5(uint32_t bits) {
    static const uint8_t kMask[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t rep = vcombine_u8(vdup_n_u8(static_cast<uint8_t>(bits)), vdup_n_u8(static_cast<uint8_t>(bits >> 8)));
    return vreinterpretq_s8_u8(vandq_u8(vtstq_u8(rep, vld1q_u8(kMask)), vdupq_n_u8(16)));
}

struct NQ4_0 {
    static constexpr size_t kBytes = sizeof(BlockQ4_0);
    static constexpr bool kAsym = false;
    static void vals(const uint8_t* b, int8x16_t& lo, int8x16_t& hi) {
        const uint8x16_t q = vld1q_u8(b + offsetof(BlockQ4_0, qs));
        lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f))), vdupq_n_s8(8));
        hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
    }
};
struct NQ4_1 {
    static constexpr size_t kBytes = sizeof(BlockQ4_1);
    static constexpr bool kAsym = true;
    static void vals(const uint8_t* b, int8x16_t& lo, int8x16_t& hi) {
        const uint8x16_t q = vld1q_u8(b + offsetof(BlockQ4_1, qs));
        lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f)));
        hi = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
    }
};
struct NQ5_0 {
    static constexpr size_t kBytes = sizeof(BlockQ5_0);
    static constexpr bool kAsym = false;
    static void vals(const uint8_t* b, int8x16_t& lo, int8x16_t& hi) {
        const uint8x16_t q = vld1q_u8(b + offsetof(BlockQ5_0, qs));
        const uint32_t qh = load_u32(b + offsetof(BlockQ5_0, qh));
        lo = vsubq_s8(vorrq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f))), nbit5(qh)), vdupq_n_s8(16));
        hi = vsubq_s8(vorrq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), nbit5(qh >> 16)), vdupq_n_s8(16));
    }
};
struct NQ5_1 {
    static constexpr size_t kBytes = sizeof(BlockQ5_1);
    static constexpr bool kAsym = true;
    static void vals(const uint8_t* b, int8x16_t& lo, int8x16_t& hi) {
        const uint8x16_t q = vld1q_u8(b + offsetof(BlockQ5_1, qs));
        const uint32_t qh = load_u32(b + offsetof(BlockQ5_1, qh));
        lo = vorrq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f))), nbit5(qh));
        hi = vorrq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), nbit5(qh >> 16));
    }
};
struct NQ8_0 {
    static constexpr size_t kBytes = sizeof(BlockQ8_0);
    static constexpr bool kAsym = false;
    static void vals(const uint8_t* b, int8x16_t& lo, int8x16_t& hi) {
        lo = vld1q_s8(reinterpret_cast<const int8_t*>(b + offsetof(BlockQ8_0, qs)));
        hi = vld1q_s8(reinterpret_cast<const int8_t*>(b + offsetof(BlockQ8_0, qs) + 16));
    }
};

inline float32x4_t nhalves4(const uint8_t* p0, const uint8_t* p1, const uint8_t* p2, const uint8_t* p3) {
    const uint16_t h[4] = {load_u16(p0), load_u16(p1), load_u16(p2), load_u16(p3)};
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

template <class F, int N>
void nqtile(const uint8_t* w, size_t stride, int n_rows, int64_t nb, const GemmActs& a, int64_t t0, float* y,
            int64_t ldy, int64_t row0, const float* bias) {
    const uint8_t* rows[4];
    for (int r = 0; r < 4; ++r) rows[r] = w + static_cast<size_t>(std::min(r, n_rows - 1)) * stride;
    float32x4_t acc[N];
    for (int j = 0; j < N; ++j) acc[j] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; ++b) {
        const size_t off = static_cast<size_t>(b) * F::kBytes;
        int8x16_t wl[4], wh[4];
        for (int r = 0; r < 4; ++r) F::vals(rows[r] + off, wl[r], wh[r]);
        const float32x4_t dv = nhalves4(rows[0] + off, rows[1] + off, rows[2] + off, rows[3] + off);
        float32x4_t mv = dv;
        constexpr size_t kM = offsetof(BlockQ4_1, m);  // Q5_1 alike (static_assert above)
        if constexpr (F::kAsym) mv = nhalves4(rows[0] + off + kM, rows[1] + off + kM, rows[2] + off + kM, rows[3] + off + kM);
        for (int j = 0; j < N; ++j) {
            const int64_t tb = (t0 + j) * nb + b;
            const int8x16_t yl = vld1q_s8(a.qs + tb * QK), yh = vld1q_s8(a.qs + tb * QK + 16);
            int32x4_t p[4];
            for (int r = 0; r < 4; ++r) p[r] = ndot(ndot(vdupq_n_s32(0), wl[r], yl), wh[r], yh);
            const int32x4_t is = vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3]));
            acc[j] = vfmaq_f32(acc[j], vcvtq_f32_s32(is), vmulq_f32(dv, vdupq_n_f32(a.d[tb])));
            if constexpr (F::kAsym) acc[j] = vfmaq_f32(acc[j], mv, vdupq_n_f32(a.s[tb]));
        }
    }
    for (int j = 0; j < N; ++j) {
        float v[4];
        vst1q_f32(v, acc[j]);
        float* dst = y + (t0 + j) * ldy + row0;
        for (int r = 0; r < n_rows; ++r) dst[r] = bias ? v[r] + bias[row0 + r] : v[r];
    }
}

// 4 rows in place x 4 tokens; token blocks of 64 keep their activations in L2 while the rows pass.
template <class F>
struct Q32Neon {
    static constexpr int kTokens = 4;
    static int64_t group_rows(int64_t, size_t) { return 4; }
    static int64_t token_block(int64_t) { return 64; }
    static size_t pack_bytes(int64_t) { return 0; }
    static void pack(const uint8_t*, size_t, int, int64_t, uint8_t*) {}
    static void tile(const uint8_t* rows, size_t stride, int nt, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                     int64_t row0, int n_rows, const float* bias) {
        const int64_t nb = a.n_in / QK;
        if (nt == 4) return nqtile<F, 4>(rows, stride, n_rows, nb, a, t0, y, ldy, row0, bias);
        for (int j = 0; j < nt; ++j) nqtile<F, 1>(rows, stride, n_rows, nb, a, t0 + j, y, ldy, row0, bias);
    }
};

// ---- K-quants against Q8_K: 4 rows x N tokens in place. Per super-block, every sub-block's dot
// (sdot, exact) is multiplied by its integer scale in the int32 lanes, so the lanes of a row sum to
// the reference's isum; the 4 rows fold into one vector (addp) for the reference's float steps.
// Q4_K {d, dmin, scales[12], qs[128]}: sub-block 2c is the low nibbles of qs[32c .. 32c + 32), 2c + 1
// the high ones; the mins enter through the activations' 32-value sums.
struct NQ4K {
    static constexpr size_t kBytes = sizeof(BlockQ4_K);
    static constexpr bool kMins = true;
    // acc[j] += sum over sub-blocks of sc[s] * (values . token j's values); msum[j] = sum mn[s] * bsums32[s]
    template <int N>
    static void row(const uint8_t* x, const int8_t* const yq[N], const int16_t* const b32[N], int32x4_t acc[N],
                    int32_t msum[N]) {
        int sc[8], mn[8];
        unpack_k4_scales(x + offsetof(BlockQ4_K, scales), sc, mn);
        for (int j = 0; j < N; ++j) {
            acc[j] = vdupq_n_s32(0);
            int32_t m = 0;
            for (int s = 0; s < 8; ++s) m += mn[s] * b32[j][s];
            msum[j] = m;
        }
        const uint8_t* qs = x + offsetof(BlockQ4_K, qs);
        for (int c = 0; c < 4; ++c) {
            const uint8x16_t q0 = vld1q_u8(qs + 32 * c), q1 = vld1q_u8(qs + 32 * c + 16);
            const int8x16_t lo0 = vreinterpretq_s8_u8(vandq_u8(q0, vdupq_n_u8(0x0f)));
            const int8x16_t lo1 = vreinterpretq_s8_u8(vandq_u8(q1, vdupq_n_u8(0x0f)));
            const int8x16_t hi0 = vreinterpretq_s8_u8(vshrq_n_u8(q0, 4)), hi1 = vreinterpretq_s8_u8(vshrq_n_u8(q1, 4));
            for (int j = 0; j < N; ++j) {
                const int8_t* y = yq[j] + 64 * c;
                const int32x4_t dlo = ndot(ndot(vdupq_n_s32(0), lo0, vld1q_s8(y)), lo1, vld1q_s8(y + 16));
                const int32x4_t dhi = ndot(ndot(vdupq_n_s32(0), hi0, vld1q_s8(y + 32)), hi1, vld1q_s8(y + 48));
                acc[j] = vmlaq_n_s32(vmlaq_n_s32(acc[j], dlo, sc[2 * c]), dhi, sc[2 * c + 1]);
            }
        }
    }
    static const uint8_t* d_field(const uint8_t* x) { return x + offsetof(BlockQ4_K, d); }
    static const uint8_t* dmin_field(const uint8_t* x) { return x + offsetof(BlockQ4_K, dmin); }
};

// Q6_K {ql[128], qh[64], scales[16], d}: 16 sub-blocks of 16 signed values (see q6k_values).
struct NQ6K {
    static constexpr size_t kBytes = sizeof(BlockQ6_K);
    static constexpr bool kMins = false;
    template <int N>
    static void row(const uint8_t* x, const int8_t* const yq[N], const int16_t* const*, int32x4_t acc[N], int32_t*) {
        const int8_t* sc = reinterpret_cast<const int8_t*>(x + offsetof(BlockQ6_K, scales));
        for (int j = 0; j < N; ++j) acc[j] = vdupq_n_s32(0);
        const uint8x16_t m4 = vdupq_n_u8(0x0f), m3 = vdupq_n_u8(3);
        const int8x16_t k32 = vdupq_n_s8(32);
        for (int h = 0; h < 2; ++h) {
            const uint8_t* ql = x + offsetof(BlockQ6_K, ql) + 64 * h;
            const uint8_t* qh = x + offsetof(BlockQ6_K, qh) + 32 * h;
            for (int half = 0; half < 2; ++half) {  // values l in [16 half, 16 half + 16) of each quarter
                const uint8x16_t l0 = vld1q_u8(ql + 16 * half), l1 = vld1q_u8(ql + 32 + 16 * half);
                const uint8x16_t hb = vld1q_u8(qh + 16 * half);
                int8x16_t v[4];  // quarters k = 0..3: values 128h + 32k + 16 half + (0..15), sub-block 8h + 2k + half
                v[0] = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8(vandq_u8(hb, m3), 4))), k32);
                v[1] = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vandq_u8(l1, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 2), m3), 4))), k32);
                v[2] = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 4), m3), 4))), k32);
                v[3] = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vshrq_n_u8(hb, 6), 4))), k32);
                for (int k = 0; k < 4; ++k) {
                    const int g = 8 * h + 2 * k + half;
                    for (int j = 0; j < N; ++j)
                        acc[j] = vmlaq_n_s32(acc[j], ndot(vdupq_n_s32(0), v[k], vld1q_s8(yq[j] + 16 * g)), sc[g]);
                }
            }
        }
    }
    static const uint8_t* d_field(const uint8_t* x) { return x + offsetof(BlockQ6_K, d); }
    static const uint8_t* dmin_field(const uint8_t* x) { return x; }
};

template <class F, int N>
void nktile(const uint8_t* w, size_t stride, int n_rows, int64_t nb, const GemmActs& a, int64_t t0, float* y,
            int64_t ldy, int64_t row0, const float* bias) {
    const uint8_t* rows[4];
    for (int r = 0; r < 4; ++r) rows[r] = w + static_cast<size_t>(std::min(r, n_rows - 1)) * stride;
    float32x4_t acc[N];
    for (int j = 0; j < N; ++j) acc[j] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; ++b) {
        const size_t off = static_cast<size_t>(b) * F::kBytes;
        const int8_t* yq[N];
        const int16_t* b32[N];
        for (int j = 0; j < N; ++j) {
            yq[j] = a.qs + ((t0 + j) * nb + b) * QK_K;
            b32[j] = a.bsums32 + ((t0 + j) * nb + b) * 8;
        }
        int32x4_t p[4][N];
        int32_t ms[4][N];
        for (int r = 0; r < 4; ++r) F::template row<N>(rows[r] + off, yq, b32, p[r], ms[r]);
        const float32x4_t dv = nhalves4(F::d_field(rows[0] + off), F::d_field(rows[1] + off), F::d_field(rows[2] + off),
                                        F::d_field(rows[3] + off));
        for (int j = 0; j < N; ++j) {
            const float dy = a.d[(t0 + j) * nb + b];
            const int32x4_t is = vpaddq_s32(vpaddq_s32(p[0][j], p[1][j]), vpaddq_s32(p[2][j], p[3][j]));
            acc[j] = vfmaq_f32(acc[j], vcvtq_f32_s32(is), vmulq_f32(dv, vdupq_n_f32(dy)));
            if constexpr (F::kMins) {
                const float32x4_t dmv = nhalves4(F::dmin_field(rows[0] + off), F::dmin_field(rows[1] + off),
                                                 F::dmin_field(rows[2] + off), F::dmin_field(rows[3] + off));
                const int32_t neg[4] = {-ms[0][j], -ms[1][j], -ms[2][j], -ms[3][j]};
                acc[j] = vfmaq_f32(acc[j], vcvtq_f32_s32(vld1q_s32(neg)), vmulq_f32(dmv, vdupq_n_f32(dy)));
            }
        }
    }
    for (int j = 0; j < N; ++j) {
        float v[4];
        vst1q_f32(v, acc[j]);
        float* dst = y + (t0 + j) * ldy + row0;
        for (int r = 0; r < n_rows; ++r) dst[r] = bias ? v[r] + bias[row0 + r] : v[r];
    }
}

// 4 rows in place x 2 tokens (each row block is unpacked once for both).
template <class F>
struct KNeon {
    static constexpr int kTokens = 2;
    static int64_t group_rows(int64_t, size_t) { return 4; }
    static int64_t token_block(int64_t) { return 64; }
    static size_t pack_bytes(int64_t) { return 0; }
    static void pack(const uint8_t*, size_t, int, int64_t, uint8_t*) {}
    static void tile(const uint8_t* rows, size_t stride, int nt, const GemmActs& a, int64_t t0, float* y, int64_t ldy,
                     int64_t row0, int n_rows, const float* bias) {
        const int64_t nb = a.n_in / QK_K;
        if (nt == 2) return nktile<F, 2>(rows, stride, n_rows, nb, a, t0, y, ldy, row0, bias);
        nktile<F, 1>(rows, stride, n_rows, nb, a, t0, y, ldy, row0, bias);
    }
};

}  // namespace
#endif  // X2L_GEMM_NEON

// ------------------------------------------------------------------------------ 6. dispatch
bool gemm_supported(DType w) {
#if defined(X2L_GEMM_AVX2)
    switch (w) {
        case DType::F32:
        case DType::F16:
        case DType::BF16:
        case DType::Q4_K:
        case DType::Q6_K:
        case DType::Q4_0:
        case DType::Q4_1:
        case DType::Q5_0:
        case DType::Q5_1:
        case DType::Q8_0: return true;
        default: return false;
    }
#elif defined(X2L_GEMM_NEON)
    switch (w) {
        case DType::F32:
        case DType::F16:
        case DType::BF16:
        case DType::Q4_0:
        case DType::Q4_1:
        case DType::Q5_0:
        case DType::Q5_1:
        case DType::Q8_0:
        case DType::Q4_K:
        case DType::Q6_K: return true;
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
        case DType::Q4_K: return kgemm<FQ4K>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q6_K: return kgemm<FQ6K>(w, w_stride, r0, r1, a, y, ldy, bias);
        default: break;
    }
#elif defined(X2L_GEMM_NEON)
    switch (wt) {
        case DType::F32: return tiled_gemm<FloatNeon<NF32>>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::F16: return tiled_gemm<FloatNeon<NF16>>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::BF16: return tiled_gemm<FloatNeon<NBF16>>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q4_0: return tiled_gemm<Q32Neon<NQ4_0>>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q4_1: return tiled_gemm<Q32Neon<NQ4_1>>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q5_0: return tiled_gemm<Q32Neon<NQ5_0>>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q5_1: return tiled_gemm<Q32Neon<NQ5_1>>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q8_0: return tiled_gemm<Q32Neon<NQ8_0>>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q4_K: return tiled_gemm<KNeon<NQ4K>>(w, w_stride, r0, r1, a, y, ldy, bias);
        case DType::Q6_K: return tiled_gemm<KNeon<NQ6K>>(w, w_stride, r0, r1, a, y, ldy, bias);
        default: break;
    }
#endif
    gemm_reference(wt, w, w_stride, r0, r1, a, y, ldy, bias);
}

}  // namespace x2l
