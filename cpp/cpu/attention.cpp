#include "cpu/attention.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/common.h"
#include "cpu/quant.h"
#include "cpu/simd.h"

namespace x2l {

namespace {

// Adds a thread's partial votes to the layer's (or keeps the larger of the two, for max votes).
void merge_votes(float* dst, const float* src, size_t n, bool max) {
    if (max) {
        for (size_t i = 0; i < n; ++i) dst[i] = std::max(dst[i], src[i]);
    } else {
        for (size_t i = 0; i < n; ++i) dst[i] += src[i];
    }
}

// Scores of one query head against a segment's keys, for entries [0, count).
void score_segment(const KVSegment& s, int layer, int kvh, int64_t count, const float* q, const uint8_t* q8,
                          float scale, float* out) {
    const int hd = s.head_dim();
    switch (s.type()) {
        case DType::F32:
            for (int64_t i = 0; i < count; ++i) out[i] = dot_f32(reinterpret_cast<const float*>(s.k_row(layer, kvh, i)), q, hd) * scale;
            break;
        case DType::F16:
            for (int64_t i = 0; i < count; ++i) out[i] = dot_f16_f32(reinterpret_cast<const uint16_t*>(s.k_row(layer, kvh, i)), q, hd) * scale;
            break;
        default:  // quantized keys: integer dot against the Q8_0 query, dequantized in the kernel
            for (int64_t i = 0; i < count; ++i) out[i] = vec_dot(s.type(), hd, s.k_row(layer, kvh, i), q8) * scale;
            break;
    }
}

void accumulate_segment(const KVSegment& s, int layer, int kvh, int64_t count, const float* p, float* out,
                               float* tmp) {
    const int hd = s.head_dim();
    for (int64_t i = 0; i < count; ++i) {
        if (p[i] == 0.0f) continue;
        const uint8_t* row = s.v_row(layer, kvh, i);
        switch (s.type()) {
            case DType::F32: axpy_f32(p[i], reinterpret_cast<const float*>(row), out, hd); break;
            case DType::F16: axpy_f16(p[i], reinterpret_cast<const uint16_t*>(row), out, hd); break;
            default:
                dequantize_row(s.type(), row, tmp, hd);
                axpy_f32(p[i], tmp, out, hd);
                break;
        }
    }
}

// One softmax row per (token, head), for head sizes without a tiled kernel.
void attention_rows(ThreadPool& pool, AttentionScratch& ws, const AttentionShape& c, int layer, const float* q_all,
                    float* out_all, int64_t t_begin, int64_t t_end, int64_t first, const KVCache& cache,
                    const AttentionObserver* hooks) {
    const int hd = c.head_dim;
    const int group = c.n_head / c.n_head_kv;
    const int64_t QD = static_cast<int64_t>(c.n_head) * hd;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const size_t score_stride = static_cast<size_t>(cache.capacity() + 1);
    const size_t q8_stride = ws.qbuf.size() / pool.n_threads();
    const auto& prefix = cache.prefix();
    const KVSegment& tail = cache.tail();
    bool need_q8 = tail.type() == DType::Q8_0 || tail.type() == DType::Q4_0;
    for (const KVSegment* s : prefix) need_q8 |= s->type() == DType::Q8_0 || s->type() == DType::Q4_0;

    const int64_t n_tasks = (t_end - t_begin) * c.n_head;
    // Attention observation (X²L importance and scorer statistics): per-thread partial sums.
    const bool observe = hooks && hooks->out && hooks->end > hooks->begin;
    const int64_t obs_n = observe ? hooks->end - hooks->begin : 0;
    const size_t part = static_cast<size_t>(c.n_head_kv) * obs_n;  // one accumulator per thread
    if (observe) ws.obs_part.assign(static_cast<size_t>(pool.n_threads()) * part, 0.0f);
    pool.run([&](int ith, int nth) {
        float* scores = ws.scores.data() + ith * score_stride;
        uint8_t* q8 = ws.qbuf.data() + ith * q8_stride;
        float* tmp = ws.vtmp.data() + static_cast<size_t>(ith) * hd;
        for (int64_t task = ith; task < n_tasks; task += nth) {
            const int64_t t = t_begin + task / c.n_head;
            const int h = static_cast<int>(task % c.n_head);
            const int kvh = h / group;
            const float* q = q_all + t * QD + static_cast<int64_t>(h) * hd;
            if (need_q8) quantize_row(DType::Q8_0, q, q8, hd);
            // Scores over the prefix segments, then the tail up to this token (causal).
            int64_t off = 0;
            for (const KVSegment* s : prefix) {
                score_segment(*s, layer, kvh, s->size(), q, q8, scale, scores + off);
                off += s->size();
            }
            const int64_t n_tail = first + t + 1;
            score_segment(tail, layer, kvh, n_tail, q, q8, scale, scores + off);
            const int64_t n_vis = off + n_tail;
            softmax(scores, n_vis);
            if (observe && t >= hooks->from && t < hooks->to) {
                float* acc = ws.obs_part.data() + static_cast<size_t>(ith) * part + static_cast<size_t>(kvh) * obs_n;
                const int64_t e1 = std::min(hooks->end, n_vis);
                if (hooks->max) {
                    for (int64_t e = hooks->begin; e < e1; ++e) acc[e - hooks->begin] = std::max(acc[e - hooks->begin], scores[e]);
                } else {
                    for (int64_t e = hooks->begin; e < e1; ++e) acc[e - hooks->begin] += scores[e];
                }
            }
            float* out = out_all + t * QD + static_cast<int64_t>(h) * hd;
            std::memset(out, 0, sizeof(float) * hd);
            off = 0;
            for (const KVSegment* s : prefix) {
                accumulate_segment(*s, layer, kvh, s->size(), scores + off, out, tmp);
                off += s->size();
            }
            accumulate_segment(tail, layer, kvh, n_tail, scores + off, out, tmp);
        }
    });
    if (observe) {
        float* dst = hooks->out;
        for (int th = 0; th < pool.n_threads(); ++th) {
            const float* src = ws.obs_part.data() + static_cast<size_t>(th) * part;
            merge_votes(dst, src, part, hooks->max);
        }
    }
}

// ---- Tiled attention (prefill and decode).
//
// One task is a block of tokens times the query heads of one KV head (GQA rows share their keys):
// rows r = (token, head) with token = tb + r / group. For every tile of kTileKeys cache entries the
// keys are converted to f32 once, transposed (Kt [head_dim, tile]), and the values converted
// (V [tile, head_dim]; f32 values are read in place), and then every row of the task runs
//   S = Q · Kt                      scores, Q pre-scaled by 1/sqrt(head_dim)
//   online softmax per row          running max m and sum l; P = exp(S - m) in place of S
//   O = O * corr + P · V            corr = exp(m_old - m_new) rescales what was accumulated
// The two products are one register-blocked kernel (micro below): kMR rows x kNV vectors of
// accumulators, sized from the ISA's register file so that they never spill (AVX2: 6 x 2 ymm,
// AVX-512: 12 x 2 zmm, NEON: 12 x 2 q). No [n_ctx] score row is materialised.
using simd::F;
constexpr int W = simd::kLanes;
constexpr int kTileKeys = 64;
constexpr int kNV = 2;  // vectors per micro-tile row: the broadcast A value feeds kNV FMAs
// Rows per micro-tile: kMR * kNV accumulators + kNV B vectors + 1 broadcast within the registers.
constexpr int kMR = (simd::kRegs - kNV - 1) / kNV < 12 ? (simd::kRegs - kNV - 1) / kNV : 12;
constexpr int kMaxHeadDim = 256;
constexpr int kTaskRows = 96;  // rows per task: tile conversion cost shared by ~100 rows

// C[r][0, NV * W) = (Scale ? C[r] * scale[r] : 0) + sum_k A[r][k] B[k][0, NV * W), for r < MR.
template <int MR, int NV, bool Scale>
void micro(const float* A, size_t lda, const float* B, size_t ldb, int K, float* C, size_t ldc, const float* scale) {
    F acc[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = Scale ? simd::load(C + r * ldc + v * W) * scale[r] : simd::zero();
    for (int k = 0; k < K; ++k) {
        F b[NV];
        for (int v = 0; v < NV; ++v) b[v] = simd::load(B + k * ldb + v * W);
        for (int r = 0; r < MR; ++r) {
            const F a = simd::set1(A[r * lda + k]);
            for (int v = 0; v < NV; ++v) acc[r][v] = simd::fmadd(a, b[v], acc[r][v]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) simd::store(C + r * ldc + v * W, acc[r][v]);
}

using MicroFn = void (*)(const float*, size_t, const float*, size_t, int, float*, size_t, const float*);
template <int NV, bool Scale, int... R>
constexpr std::array<MicroFn, sizeof...(R)> micro_table(std::integer_sequence<int, R...>) {
    return {micro<R + 1, NV, Scale>...};
}
template <int NV, bool Scale>
constexpr std::array<MicroFn, kMR> kMicro = micro_table<NV, Scale>(std::make_integer_sequence<int, kMR>{});

// C [M, N] = (Scale ? C * scale[row] : 0) + A [M, K] · B [K, N]; N a multiple of W.
template <bool Scale>
void small_gemm(int M, int N, int K, const float* A, size_t lda, const float* B, size_t ldb, float* C, size_t ldc,
                const float* scale) {
    for (int n0 = 0; n0 < N; n0 += kNV * W) {
        const bool full = N - n0 >= kNV * W;
        for (int r0 = 0; r0 < M; r0 += kMR) {
            const int mr = std::min(kMR, M - r0);
            const MicroFn fn = full ? kMicro<kNV, Scale>[mr - 1] : kMicro<1, Scale>[mr - 1];
            fn(A + r0 * lda, lda, B + n0, ldb, K, C + r0 * ldc + n0, ldc, Scale ? scale + r0 : nullptr);
        }
    }
}

// dst [n, m] = src [m, n]^T for n, m multiples of kT (dst rows ldd apart, src rows lds apart).
#if defined(X2L_SIMD_AVX2) || defined(X2L_SIMD_AVX512)
constexpr int kT = 8;
inline void transpose_block(const float* s, size_t lds, float* d, size_t ldd) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * lds);
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {
        const __m256* u = t + 4 * h;
        r[4 * h + 0] = _mm256_shuffle_ps(u[0], u[2], 0x44);
        r[4 * h + 1] = _mm256_shuffle_ps(u[0], u[2], 0xee);
        r[4 * h + 2] = _mm256_shuffle_ps(u[1], u[3], 0x44);
        r[4 * h + 3] = _mm256_shuffle_ps(u[1], u[3], 0xee);
    }
    for (int c = 0; c < 4; ++c) {
        _mm256_storeu_ps(d + c * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
        _mm256_storeu_ps(d + (c + 4) * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
    }
}
#elif defined(X2L_SIMD_NEON)
constexpr int kT = 4;
inline void transpose_block(const float* s, size_t lds, float* d, size_t ldd) {
    const float32x4x2_t a = vtrnq_f32(vld1q_f32(s), vld1q_f32(s + lds));
    const float32x4x2_t b = vtrnq_f32(vld1q_f32(s + 2 * lds), vld1q_f32(s + 3 * lds));
    vst1q_f32(d, vcombine_f32(vget_low_f32(a.val[0]), vget_low_f32(b.val[0])));
    vst1q_f32(d + ldd, vcombine_f32(vget_low_f32(a.val[1]), vget_low_f32(b.val[1])));
    vst1q_f32(d + 2 * ldd, vcombine_f32(vget_high_f32(a.val[0]), vget_high_f32(b.val[0])));
    vst1q_f32(d + 3 * ldd, vcombine_f32(vget_high_f32(a.val[1]), vget_high_f32(b.val[1])));
}
#else
constexpr int kT = 4;
inline void transpose_block(const float* s, size_t lds, float* d, size_t ldd) {
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) d[j * ldd + i] = s[i * lds + j];
}
#endif
static_assert(W % kT == 0 || kT % W == 0, "transpose blocks and vectors must nest");

bool tiled_attention_supported(int head_dim) {
    return head_dim > 0 && head_dim <= kMaxHeadDim && head_dim % W == 0 && head_dim % kT == 0;
}

// Per-thread tile buffers (floats): Kr [tile, hd] keys as f32 before the transpose, Kt [hd, tile],
// V [tile, hd], Q [rows, hd], S [rows, tile], corr [rows], O [rows, hd], m, l [rows].
struct TileBuffers {
    float *kr, *kt, *v, *q, *s, *corr, *o, *m, *l;
    static size_t floats(int hd, int rows) {
        return static_cast<size_t>(3 * kTileKeys * hd + rows * (2 * hd + kTileKeys + 3)) + 16;
    }
    TileBuffers(float* base, int hd, int rows) {
        kr = base;
        kt = kr + kTileKeys * hd;
        v = kt + kTileKeys * hd;
        q = v + kTileKeys * hd;
        s = q + static_cast<size_t>(rows) * hd;
        corr = s + static_cast<size_t>(rows) * kTileKeys;
        o = corr + rows;
        m = o + static_cast<size_t>(rows) * hd;
        l = m + rows;
    }
};

// Keys [j0, j0 + nb) of a segment as Kt [hd, kTileKeys] (columns >= nb padded with zeros up to a
// multiple of kT), and the values as f32 rows [nb, hd]: returns where they are (in place for f32).
const float* load_tile(const KVSegment& seg, int layer, int kvh, int64_t j0, int nb, bool want_v, const TileBuffers& b) {
    const int hd = seg.head_dim();
    const int nb_pad = (nb + kT - 1) / kT * kT;
    const float* kr;
    if (seg.type() == DType::F32 && nb == nb_pad) {
        kr = reinterpret_cast<const float*>(seg.k_row(layer, kvh, j0));
    } else {
        // Rows of one (layer, head) are contiguous: one conversion call for the whole tile.
        dequantize_row(seg.type(), seg.k_row(layer, kvh, j0), b.kr, static_cast<int64_t>(nb) * hd);
        std::fill(b.kr + static_cast<size_t>(nb) * hd, b.kr + static_cast<size_t>(nb_pad) * hd, 0.0f);
        kr = b.kr;
    }
    for (int j = 0; j < nb_pad; j += kT)
        for (int d = 0; d < hd; d += kT) transpose_block(kr + static_cast<size_t>(j) * hd + d, hd, b.kt + d * kTileKeys + j, kTileKeys);
    if (!want_v) return nullptr;
    if (seg.type() == DType::F32) return reinterpret_cast<const float*>(seg.v_row(layer, kvh, j0));
    dequantize_row(seg.type(), seg.v_row(layer, kvh, j0), b.v, static_cast<int64_t>(nb) * hd);
    return b.v;
}

// Visible entries of tile [j0, j0 + nb) for row r: every one for the prefix, causally for the tail.
struct RowVisibility {
    int64_t first, tb;
    int group;
    bool causal;
    int operator()(int r, int64_t j0, int nb) const {
        if (!causal) return nb;
        return static_cast<int>(std::clamp<int64_t>(first + tb + r / group + 1 - j0, 0, nb));
    }
};

// Online-softmax step of one tile for rows [r_lo, rows) whose scores are in b.s: updates m and l,
// leaves P = exp(S - m_new) (0 past each row's visible entries) in place and corr[r - r_lo].
void softmax_update(const TileBuffers& b, int r_lo, int rows, int nb, int64_t j0, const RowVisibility& vis) {
    const int n_cols = (nb + W - 1) / W * W;
    float* corr = b.corr + r_lo;
    for (int r = r_lo; r < rows; ++r) {
        float* sr = b.s + static_cast<size_t>(r) * kTileKeys;
        const int nv = vis(r, j0, nb);
        F mx = simd::set1(-INFINITY);
        for (int j = 0; j < n_cols; j += W) mx = simd::max(mx, simd::first_n(simd::load(sr + j), nv - j, -INFINITY));
        const float m_new = std::max(b.m[r], simd::hmax(mx));
        corr[r - r_lo] = b.m[r] == -INFINITY ? 0.0f : exp_neg(b.m[r] - m_new);
        const F mv = simd::set1(m_new);
        F sum = simd::zero();
        for (int j = 0; j < n_cols; j += W) {
            const F p = simd::first_n(simd::exp_neg(simd::load(sr + j) - mv), nv - j, 0.0f);
            simd::store(sr + j, p);
            sum = sum + p;
        }
        b.m[r] = m_new;
        b.l[r] = b.l[r] * corr[r - r_lo] + simd::hsum(sum);
    }
}

// Rows see a non-decreasing number of entries: the rows that see none of a tile form a prefix.
int first_seeing_row(int rows, int nb, int64_t j0, const RowVisibility& vis) {
    int r_lo = 0;
    while (r_lo < rows && vis(r_lo, j0, nb) == 0) ++r_lo;
    return r_lo;
}

// One tile for rows [0, rows), many rows: S = Q · Kt, online softmax, O = O * corr + P · V.
void tile_update(const TileBuffers& b, const float* v, int hd, int rows, int nb, int64_t j0, const RowVisibility& vis) {
    const int r_lo = first_seeing_row(rows, nb, j0, vis);
    if (r_lo == rows) return;
    const int m_rows = rows - r_lo;
    float* s = b.s + static_cast<size_t>(r_lo) * kTileKeys;
    small_gemm<false>(m_rows, (nb + W - 1) / W * W, hd, b.q + static_cast<size_t>(r_lo) * hd, hd, b.kt, kTileKeys, s,
                      kTileKeys, nullptr);
    softmax_update(b, r_lo, rows, nb, j0, vis);
    // Entries past a row's visible count have P = 0; past the last row's count (nb) they may be
    // garbage, so the product stops there.
    const int k_max = vis(rows - 1, j0, nb);
    small_gemm<true>(m_rows, hd, k_max, s, kTileKeys, v, hd, b.o + static_cast<size_t>(r_lo) * hd, hd, b.corr + r_lo);
}

// ---- Few rows (decode: one token's query heads of a KV head). Converting and transposing a tile
// for 1-4 rows costs more than the products, so the keys and values are read in place (f16 converted
// as they are loaded): scores as dot products, O += P · V row by row.
constexpr int kNarrowRows = 4;

inline F load_elems(const float* p) { return simd::load(p); }
inline F load_elems(const uint16_t* p) { return simd::load_f16(p); }

// s[r][j] = q_r · k_j for R rows and KB keys (k_j at k + j * hd); KB * R accumulators.
template <int R, int KB, class T>
inline void dot_block(const float* q, int hd, const T* k, float* s) {
    F acc[R][KB];
    for (int r = 0; r < R; ++r)
        for (int kb = 0; kb < KB; ++kb) acc[r][kb] = simd::zero();
    for (int c = 0; c < hd; c += W) {
        F kv[KB];
        for (int kb = 0; kb < KB; ++kb) kv[kb] = load_elems(k + static_cast<size_t>(kb) * hd + c);
        for (int r = 0; r < R; ++r) {
            const F qv = simd::load(q + r * hd + c);
            for (int kb = 0; kb < KB; ++kb) acc[r][kb] = simd::fmadd(qv, kv[kb], acc[r][kb]);
        }
    }
    for (int r = 0; r < R; ++r) simd::hsum_n<KB>(acc[r], s + r * kTileKeys);
}

template <int R, class T>
void dot_scores(const float* q, int hd, const T* k, int nb, float* s) {
    constexpr int KB = (simd::kRegs - 2) / (R + 1) < 8 ? (simd::kRegs - 2) / (R + 1) : 8;
    int j = 0;
    for (; j + KB <= nb; j += KB) dot_block<R, KB>(q, hd, k + static_cast<size_t>(j) * hd, s + j);
    for (; j < nb; ++j) dot_block<R, 1>(q, hd, k + static_cast<size_t>(j) * hd, s + j);
}

// o[r][c0, c0 + NC * W) = o * corr[r] + sum_j p[r][j] v_j[c0 ...] for j < k_max.
template <int R, int NC, class T>
inline void pv_pass(const float* p, const T* v, int hd, int k_max, int c0, float* o, const float* corr) {
    F acc[R][NC];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NC; ++i) acc[r][i] = simd::load(o + r * hd + c0 + i * W) * corr[r];
    for (int j = 0; j < k_max; ++j) {
        F vv[NC];
        for (int i = 0; i < NC; ++i) vv[i] = load_elems(v + static_cast<size_t>(j) * hd + c0 + i * W);
        for (int r = 0; r < R; ++r) {
            const F pr = simd::set1(p[r * kTileKeys + j]);
            for (int i = 0; i < NC; ++i) acc[r][i] = simd::fmadd(pr, vv[i], acc[r][i]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NC; ++i) simd::store(o + r * hd + c0 + i * W, acc[r][i]);
}

template <int R, class T>
void pv_rows(const float* p, const T* v, int hd, int k_max, float* o, const float* corr) {
    constexpr int NC = (simd::kRegs - 1) / (R + 1) < 8 ? (simd::kRegs - 1) / (R + 1) : 8;
    int c0 = 0;
    for (; c0 + NC * W <= hd; c0 += NC * W) pv_pass<R, NC>(p, v, hd, k_max, c0, o, corr);
    for (; c0 < hd; c0 += W) pv_pass<R, 1>(p, v, hd, k_max, c0, o, corr);
}

template <class T>
void narrow_products(int m_rows, const float* q, int hd, const T* k, const T* v, int nb, int k_max, const TileBuffers& b,
                     int r_lo, bool scores) {
    float* s = b.s + static_cast<size_t>(r_lo) * kTileKeys;
    float* o = b.o + static_cast<size_t>(r_lo) * hd;
    const float* corr = b.corr + r_lo;
    switch (m_rows) {
        case 1: return scores ? dot_scores<1>(q, hd, k, nb, s) : pv_rows<1>(s, v, hd, k_max, o, corr);
        case 2: return scores ? dot_scores<2>(q, hd, k, nb, s) : pv_rows<2>(s, v, hd, k_max, o, corr);
        case 3: return scores ? dot_scores<3>(q, hd, k, nb, s) : pv_rows<3>(s, v, hd, k_max, o, corr);
        default: return scores ? dot_scores<4>(q, hd, k, nb, s) : pv_rows<4>(s, v, hd, k_max, o, corr);
    }
}

// The narrow counterpart of load_tile + tile_update: keys [j0, j0 + nb) of a segment for <= kNarrowRows rows.
void tile_update_narrow(const KVSegment& seg, int layer, int kvh, int64_t j0, int nb, const TileBuffers& b, int hd,
                        int rows, const RowVisibility& vis) {
    static_assert(kNarrowRows == 4, "narrow_products dispatches 1-4 rows");
    const int r_lo = first_seeing_row(rows, nb, j0, vis);
    if (r_lo == rows) return;
    const int m_rows = rows - r_lo, k_max = vis(rows - 1, j0, nb);
    const float* q = b.q + static_cast<size_t>(r_lo) * hd;
    if (seg.type() == DType::F16 || seg.type() == DType::F32) {
        auto run = [&](auto tag) {
            using T = decltype(tag);
            const T* k = reinterpret_cast<const T*>(seg.k_row(layer, kvh, j0));
            const T* v = reinterpret_cast<const T*>(seg.v_row(layer, kvh, j0));
            narrow_products<T>(m_rows, q, hd, k, v, nb, k_max, b, r_lo, true);
            softmax_update(b, r_lo, rows, nb, j0, vis);
            narrow_products<T>(m_rows, q, hd, k, v, nb, k_max, b, r_lo, false);
        };
        if (seg.type() == DType::F16) run(uint16_t{});
        else run(float{});
        return;
    }
    // Quantized rows: dequantized once per tile (one call each for K and V), then read as f32.
    dequantize_row(seg.type(), seg.k_row(layer, kvh, j0), b.kr, static_cast<int64_t>(nb) * hd);
    dequantize_row(seg.type(), seg.v_row(layer, kvh, j0), b.v, static_cast<int64_t>(nb) * hd);
    narrow_products<float>(m_rows, q, hd, b.kr, b.v, nb, k_max, b, r_lo, true);
    softmax_update(b, r_lo, rows, nb, j0, vis);
    narrow_products<float>(m_rows, q, hd, b.kr, b.v, nb, k_max, b, r_lo, false);
}

// Adds the final probabilities exp(s - m) / l of the observed rows over the observed entries to
// acc [obs entries] (this KV head's slice of a per-thread accumulator).
void observe_task(const TileBuffers& b, int hd, int layer, int kvh, int rows, const RowVisibility& vis,
                  const std::vector<const KVSegment*>& prefix, const KVSegment& tail, const AttentionObserver& hooks,
                  int64_t n_vis, float* acc) {
    auto observe_segment = [&](const KVSegment& seg, int64_t g, int64_t a, int64_t e, bool causal) {
        RowVisibility v = vis;
        v.causal = causal;
        for (int64_t j0 = a; j0 < e; j0 += kTileKeys) {
            const int nb = static_cast<int>(std::min<int64_t>(kTileKeys, e - j0));
            load_tile(seg, layer, kvh, j0, nb, false, b);
            const int n_cols = (nb + W - 1) / W * W;
            small_gemm<false>(rows, n_cols, hd, b.q, hd, b.kt, kTileKeys, b.s, kTileKeys, nullptr);
            for (int r = 0; r < rows; ++r) {
                const int64_t t = vis.tb + r / vis.group;
                if (t < hooks.from || t >= hooks.to) continue;
                const int nv = v(r, j0, nb);
                if (nv == 0) continue;
                const float* sr = b.s + static_cast<size_t>(r) * kTileKeys;
                const float m = b.m[r], inv_l = 1.0f / b.l[r];
                float* dst = acc + (g + j0 - hooks.begin);
                if (hooks.max) {
                    for (int j = 0; j < nv; ++j) dst[j] = std::max(dst[j], exp_neg(sr[j] - m) * inv_l);
                } else {
                    for (int j = 0; j < nv; ++j) dst[j] += exp_neg(sr[j] - m) * inv_l;
                }
            }
        }
    };
    int64_t g = 0;
    for (const KVSegment* seg : prefix) {
        const int64_t a = std::max(hooks.begin, g), e = std::min({hooks.end, g + seg->size(), n_vis});
        if (a < e) observe_segment(*seg, g, a - g, e - g, false);
        g += seg->size();
    }
    const int64_t a = std::max(hooks.begin, g), e = std::min(hooks.end, n_vis);
    if (a < e) observe_segment(tail, g, a - g, e - g, true);
}

void attention_tiled(ThreadPool& pool, AttentionScratch& ws, const AttentionShape& c, int layer, const float* q_all,
                     float* out_all, int64_t t_begin, int64_t t_end, int64_t first, const KVCache& cache,
                     const AttentionObserver* hooks) {
    const int hd = c.head_dim, group = c.n_head / c.n_head_kv, H = c.n_head_kv;
    // Tokens per task: about kTaskRows rows (each tile's conversion is shared by all of them).
    const int BT = std::max(1, kTaskRows / group);
    const int rows_max = BT * group;
    const int64_t QD = static_cast<int64_t>(c.n_head) * hd;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const auto& prefix = cache.prefix();
    const KVSegment& tail = cache.tail();
    const size_t stride = TileBuffers::floats(hd, rows_max);
    if (ws.tiles.size() < stride * pool.n_threads()) ws.tiles.assign(stride * pool.n_threads(), 0.0f);
    int64_t n_prefix = 0;
    for (const KVSegment* seg : prefix) n_prefix += seg->size();
    const int64_t n_blocks = (t_end - t_begin + BT - 1) / BT;
    const int64_t base_tasks = n_blocks * H;
    const int nth_all = pool.n_threads();
    const int64_t most_entries = n_prefix + first + t_end;
    // Observation (X²L importance): the final probabilities of the observed queries over entries
    // [obs_begin, obs_end), summed per KV head; recomputed per tile once each row's max and sum are known.
    const bool observe = hooks && hooks->out && hooks->end > hooks->begin;
    const int64_t obs_n = observe ? hooks->end - hooks->begin : 0;
    const size_t obs_part = static_cast<size_t>(H) * obs_n;
    if (observe) ws.obs_part.assign(static_cast<size_t>(nth_all) * obs_part, 0.0f);
    // Few (block, KV head) tasks, as in decode: split the entries too (flash-decoding) so that every
    // thread has work, then merge the partial softmaxes. Splits are tile-aligned.
    int64_t n_split = 1;
    if (base_tasks < 2 * nth_all && !observe) {
        n_split = std::clamp<int64_t>((2 * nth_all + base_tasks - 1) / base_tasks, 1,
                                      std::max<int64_t>(1, most_entries / (4 * kTileKeys)));
    }
    const int64_t n_tasks = base_tasks * n_split;
    const size_t part_stride = static_cast<size_t>(rows_max) * (hd + 2);  // o [rows, hd], m [rows], l [rows]
    if (n_split > 1 && ws.attn_part.size() < n_tasks * part_stride) ws.attn_part.resize(n_tasks * part_stride);
    // Causal blocks differ in cost (the last sees the most entries): threads take tasks from a shared
    // counter, costliest first. Observation keeps a fixed assignment so that its per-thread sums (and
    // so the votes) do not depend on scheduling.
    std::atomic<int64_t> next{0};
    pool.run([&](int ith, int nth) {
        const TileBuffers b(ws.tiles.data() + stride * ith, hd, rows_max);
        int64_t i = observe ? ith : next.fetch_add(1);
        for (; i < n_tasks; i = observe ? i + nth : next.fetch_add(1)) {
            const int64_t task = n_tasks - 1 - i;
            const int64_t split = task % n_split, base = task / n_split;
            const int kvh = static_cast<int>(base % H);
            const int64_t tb = t_begin + (base / H) * BT, te = std::min(t_end, tb + BT);
            const int rows = static_cast<int>(te - tb) * group;
            // This task's entries [e0, e1) of the concatenation prefix + tail (tail up to its last token).
            const int64_t n_vis = n_prefix + first + te;
            const int64_t span = ((n_vis + n_split - 1) / n_split + kTileKeys - 1) / kTileKeys * kTileKeys;
            const int64_t e0 = std::min(n_vis, split * span);
            const int64_t e1 = n_split == 1 ? n_vis : std::min(n_vis, e0 + span);
            float* o = n_split > 1 ? ws.attn_part.data() + task * part_stride : b.o;
            float* m = o + static_cast<size_t>(rows_max) * hd;
            float* l = m + rows_max;
            TileBuffers tb_bufs = b;
            tb_bufs.o = o;
            tb_bufs.m = m;
            tb_bufs.l = l;
            // row r: token tb + r / group, query head kvh * group + r % group
            auto head_offset = [&](int r) {
                return (tb + r / group) * QD + static_cast<int64_t>(kvh * group + r % group) * hd;
            };
            for (int r = 0; r < rows; ++r) {
                const float* q = q_all + head_offset(r);
                for (int d = 0; d < hd; ++d) b.q[static_cast<size_t>(r) * hd + d] = q[d] * scale;
            }
            std::fill(o, o + static_cast<size_t>(rows) * hd, 0.0f);
            std::fill(m, m + rows, -INFINITY);
            std::fill(l, l + rows, 0.0f);
            RowVisibility vis{first, tb, group, false};
            // Entries [a, e) of one segment. The prefix is visible to every row; tail entry j is
            // visible to the token t with first + t >= j.
            auto run_segment = [&](const KVSegment& seg, int64_t a, int64_t e, bool causal) {
                vis.causal = causal;
                for (int64_t j0 = a; j0 < e; j0 += kTileKeys) {
                    const int nb = static_cast<int>(std::min<int64_t>(kTileKeys, e - j0));
                    if (causal && vis(rows - 1, j0, nb) == 0) break;
                    if (rows <= kNarrowRows) {
                        tile_update_narrow(seg, layer, kvh, j0, nb, tb_bufs, hd, rows, vis);
                    } else {
                        const float* v = load_tile(seg, layer, kvh, j0, nb, true, tb_bufs);
                        tile_update(tb_bufs, v, hd, rows, nb, j0, vis);
                    }
                }
            };
            int64_t g = 0;  // first entry of the segment in the concatenation
            for (const KVSegment* seg : prefix) {
                const int64_t a = std::max(e0, g), e = std::min(e1, g + seg->size());
                if (a < e) run_segment(*seg, a - g, e - g, false);
                g += seg->size();
            }
            if (std::max(e0, g) < e1) run_segment(tail, std::max(e0, g) - g, e1 - g, true);
            if (observe) {
                observe_task(tb_bufs, hd, layer, kvh, rows, vis, prefix, tail, *hooks, n_vis,
                             ws.obs_part.data() + static_cast<size_t>(ith) * obs_part + static_cast<size_t>(kvh) * obs_n);
            }
            if (n_split > 1) continue;  // merged below
            for (int r = 0; r < rows; ++r) {
                const float inv = 1.0f / l[r];
                const float* orow = o + static_cast<size_t>(r) * hd;
                float* out = out_all + head_offset(r);
                for (int d = 0; d < hd; ++d) out[d] = orow[d] * inv;
            }
        }
    });
    if (observe) {
        float* dst = hooks->out;
        for (int th = 0; th < nth_all; ++th) {  // a fixed order: sums do not depend on scheduling
            const float* src = ws.obs_part.data() + static_cast<size_t>(th) * obs_part;
            merge_votes(dst, src, obs_part, hooks->max);
        }
    }
    if (n_split == 1) return;
    // Merge the splits of every (block, KV head): rescale each partial to the common max.
    for (int64_t base = 0; base < base_tasks; ++base) {
        const int kvh = static_cast<int>(base % H);
        const int64_t tb = t_begin + (base / H) * BT, te = std::min(t_end, tb + BT);
        const int rows = static_cast<int>(te - tb) * group;
        for (int r = 0; r < rows; ++r) {
            auto part = [&](int64_t sp) { return ws.attn_part.data() + (base * n_split + sp) * part_stride; };
            float mx = -INFINITY;
            for (int64_t sp = 0; sp < n_split; ++sp) mx = std::max(mx, part(sp)[static_cast<size_t>(rows_max) * hd + r]);
            float* out = out_all + (tb + r / group) * QD + static_cast<int64_t>(kvh * group + r % group) * hd;
            std::fill(out, out + hd, 0.0f);
            float sum = 0.0f;
            for (int64_t sp = 0; sp < n_split; ++sp) {
                const float* p = part(sp);
                const float pm = p[static_cast<size_t>(rows_max) * hd + r];
                if (pm == -INFINITY) continue;  // nothing of this split was visible to the row
                const float w = exp_neg(pm - mx);
                sum += w * p[static_cast<size_t>(rows_max) * (hd + 1) + r];
                const float* po = p + static_cast<size_t>(r) * hd;
                for (int d = 0; d < hd; ++d) out[d] += w * po[d];
            }
            const float inv = 1.0f / sum;
            for (int d = 0; d < hd; ++d) out[d] *= inv;
        }
    }
}

}  // namespace

size_t AttentionScratch::bytes() const {  // the votes' obs_part is the caller's, not the forward's
    return (scores.capacity() + vtmp.capacity() + tiles.capacity() + attn_part.capacity()) * sizeof(float) +
           qbuf.capacity();
}

void attention(ThreadPool& pool, AttentionScratch& s, const AttentionShape& shape, int layer, const float* q,
               float* out, int64_t n, int64_t first, const KVCache& cache, const AttentionObserver* observer) {
    const int nth = pool.n_threads();
    s.scores.resize(static_cast<size_t>(nth) * (cache.capacity() + 1));
    s.qbuf.resize(static_cast<size_t>(nth) * row_bytes(DType::Q8_0, ((shape.head_dim + 31) / 32) * 32));
    s.vtmp.resize(static_cast<size_t>(nth) * shape.head_dim);
    if (tiled_attention_supported(shape.head_dim)) {
        attention_tiled(pool, s, shape, layer, q, out, 0, n, first, cache, observer);
    } else {
        attention_rows(pool, s, shape, layer, q, out, 0, n, first, cache, observer);
    }
}

}  // namespace x2l
