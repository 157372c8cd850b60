// Attention over a list of KV segments in temporal order (flash-attention style online softmax).
//
// One block = one KV head x a tile of QR query rows (row = (token, query head of that KV head's
// group), so GQA heads share every K/V tile they read) x one KV split. Per tile of 32 keys:
//   1. the block dequantizes K rows into shared memory as f32 (segment type: F32/F16/Q8_0/Q4_0,
//      read in place: quantized H-KV is never expanded in global memory),
//   2. lane j of each warp scores key j against the warp's RPW rows,
//   3. the warp updates each row's running max / sum (base-2 exponent; scale*log2e folded into q),
//   4. the block loads the V tile into the same buffer and each lane accumulates head_dim/32 output
//      columns of the warp's rows.
// Decode (few rows) splits the keys over gridDim.x blocks; attn_combine_kernel merges the partial
// (max, sum, acc) states. Prefill tiles skip keys no row of the block can see (causal / window).
//
// attn_tc_kernel is the same online softmax on tensor cores, for blocks of 64 query rows (the prefill,
// the vision tower): per tile of 64 keys, S = Q K^T and O += P V are WMMA products of f16 operands with
// f32 sums; the softmax between them runs on f32 scores in shared memory, where O lives too (WMMA
// fragments have no per-row access for the rescaling).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "core/common.h"
#include "cuda/common.cuh"
#include "cuda/formats.cuh"
#include "cuda/backend.h"

namespace x2l {
namespace cudak {
namespace {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kKT = 32;                   // keys per tile: one per lane when scoring
constexpr int kMaxHeadDim = 256;
constexpr int kDSlots = kMaxHeadDim / 32;  // output columns per lane
constexpr int kMaxSplits = 64;

struct AttnArgs {
    const float* q;
    int64_t q_tok_stride;     // floats
    float* out;
    int64_t out_tok_stride;   // floats
    const CudaKVSegment* segs;
    int n_segs;
    int n_q, n_head, n_kv_head, head_dim, n_rep;
    int64_t n_kv;
    float scale_log2;         // softmax scale * log2(e)
    int causal, window;
    int n_splits;
    int64_t split_len;        // keys per split (multiple of kKT)
    float* ws_acc;            // [n_splits, n_q * n_head, head_dim]
    float* ws_ml;             // [n_splits, n_q * n_head, 2]: running max (log2 domain), sum
    float* lse;               // [n_q, n_head] or null: max + log2(sum) of the scaled scores (n_splits == 1)
    const int32_t* own_len;   // device or null: the last segment's length, read at run time (n_kv counts own_max)
    int64_t own_max;
    int64_t q_batch_stride, out_batch_stride;  // floats between problems (blockIdx.z / n_kv_head)
};

// Dequantize rows [first, first + nk) of one KV head into tile[ROWS][ld] as T (f32, or f16 for the
// tensor cores); rows >= nk and columns [D, dp) are zeroed (V rows multiply p = 0, and 0 * garbage
// could be NaN).
__device__ __forceinline__ float tile_value(float v, float*) { return v; }
__device__ __forceinline__ __half tile_value(float v, __half*) { return to_half_sat(v); }

template <typename F, int ROWS, typename T>
__device__ void load_tile(const uint8_t* base, int64_t tok_stride, int64_t first, int nk, int D, int dp, int ld, T* tile) {
    const int upr = D / F::VPT;  // units per row
    for (int i = threadIdx.x; i < ROWS * upr; i += kAttnThreads) {
        const int jj = i / upr, u = i - jj * upr;
        float v[F::VPT];
        if (jj < nk) {
            F::load(base + (first + jj) * tok_stride, u, v);
        } else {
#pragma unroll
            for (int c = 0; c < F::VPT; ++c) v[c] = 0.f;
        }
        T* dst = tile + jj * ld + F::pos0(u);
#pragma unroll
        for (int g = 0; g < F::NG; ++g)
#pragma unroll
            for (int c = 0; c < F::G; ++c) dst[g * F::GAP + c] = tile_value(v[g * F::G + c], dst);
    }
    const int pad = dp - D;
    for (int i = threadIdx.x; i < ROWS * pad; i += kAttnThreads) tile[(i / pad) * ld + D + i % pad] = tile_value(0.f, tile);
}

template <int ROWS, typename T>
__device__ void load_tile_any(uint32_t type, const uint8_t* base, int64_t tok_stride, int64_t first, int nk, int D, int dp,
                              int ld, T* tile) {
    switch (type) {
        case kF16: load_tile<Fmt<kF16>, ROWS>(base, tok_stride, first, nk, D, dp, ld, tile); break;
        case kQ8_0: load_tile<Fmt<kQ8_0>, ROWS>(base, tok_stride, first, nk, D, dp, ld, tile); break;
        case kQ4_0: load_tile<Fmt<kQ4_0>, ROWS>(base, tok_stride, first, nk, D, dp, ld, tile); break;
        case kF32: load_tile<Fmt<kF32>, ROWS>(base, tok_stride, first, nk, D, dp, ld, tile); break;
        default:  // rejected on the host (CudaSegmentTable); zeros keep a bad table harmless
            for (int i = threadIdx.x; i < ROWS * ld; i += kAttnThreads) tile[i] = tile_value(0.f, tile);
    }
}

// Keys [lo, hi] that query row gr of a KV head sees (query t sits at kv index n_kv - n_q + t): up to
// itself when causal, only the last `window` when window > 0. A row past the end sees none (hi = -1).
struct KeyRange {
    int64_t lo, hi;
};
__device__ __forceinline__ KeyRange row_keys(const AttnArgs& a, int64_t n_kv, int gr) {
    const int64_t qpos = n_kv - a.n_q + gr / a.n_rep;
    return {a.window > 0 ? qpos - a.window + 1 : 0, gr < a.n_q * a.n_rep ? (a.causal ? qpos : n_kv - 1) : -1};
}
// The keys any of rows [row0, row0 + n) sees (tokens are monotonic in the row index); row0 exists.
__device__ __forceinline__ KeyRange block_keys(const AttnArgs& a, int64_t n_kv, int row0, int n) {
    return {row_keys(a, n_kv, row0).lo, row_keys(a, n_kv, min(row0 + n, a.n_q * a.n_rep) - 1).hi};
}

// Rows [row0, row0 + QR) of KV head hk's query rows, scaled by scale_log2, into qs[QR][D] (zero past the end).
__device__ __forceinline__ void load_scaled_queries(const AttnArgs& a, const float* q, int row0, int hk, int QR, float* qs) {
    const int D = a.head_dim, rows = a.n_q * a.n_rep;
    for (int i = threadIdx.x; i < QR * D; i += kAttnThreads) {
        const int r = i / D, d = i - r * D, gr = row0 + r;
        float val = 0.f;
        if (gr < rows) {
            const int t = gr / a.n_rep, h = hk * a.n_rep + gr % a.n_rep;
            val = q[static_cast<int64_t>(t) * a.q_tok_stride + static_cast<int64_t>(h) * D + d] * a.scale_log2;
        }
        qs[i] = val;
    }
}

// Scores of the key in krow against a warp's RPW query rows qw[RPW][D] (one key per lane), in one fixed
// summation order: the f32 attention and the log-sum-exp pass must agree on every score.
template <int RPW>
__device__ __forceinline__ void key_scores(const float* qw, const float* krow, int D, float* sc) {
#pragma unroll
    for (int i = 0; i < RPW; ++i) sc[i] = 0.f;
    for (int d = 0; d < D; ++d) {
        const float kd = krow[d];
#pragma unroll
        for (int i = 0; i < RPW; ++i) sc[i] += qw[i * D + d] * kd;
    }
}

// grid (n_splits, ceil(n_q * n_rep / QR), n_kv_head), block kAttnThreads, dynamic shared memory
// (QR * D + kKT * (D + 1) + QR * kKT) floats. RPW = query rows per warp, QR = 4 * RPW rows per block.
template <int RPW>
__global__ void __launch_bounds__(kAttnThreads) attn_kernel(AttnArgs a) {
    constexpr int QR = kAttnWarps * RPW;
    extern __shared__ float smem[];
    const int D = a.head_dim, DP = D + 1;
    float* qs = smem;            // [QR][D]
    float* kv = qs + QR * D;     // [kKT][D + 1]: K tile, then V tile; odd stride = conflict-free columns
    float* ps = kv + kKT * DP;   // [QR][kKT] probabilities of the current tile

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.x, hk = blockIdx.z % a.n_kv_head, batch = blockIdx.z / a.n_kv_head;
    const float* q = a.q + batch * a.q_batch_stride;
    float* out = a.out + batch * a.out_batch_stride;
    const CudaKVSegment* segs = a.segs + static_cast<int64_t>(batch) * a.n_segs;
    // The KV length and split size: as launched, or (graph replay) from the own entries' count now.
    int64_t n_kv = a.n_kv, split_len = a.split_len, own = -1;
    if (a.own_len) {
        own = *a.own_len;
        n_kv = a.n_kv - a.own_max + own;
        if (a.n_splits > 1) split_len = ((n_kv + a.n_splits - 1) / a.n_splits + kKT - 1) / kKT * kKT;
    }
    const int rows = a.n_q * a.n_rep;  // query rows of this KV head
    const int row0 = blockIdx.y * QR;

    load_scaled_queries(a, q, row0, hk, QR, qs);

    // Visible kv range [lo, hi] of each row this warp owns; query t sits at kv index n_kv - n_q + t.
    KeyRange vis[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) vis[i] = row_keys(a, n_kv, row0 + warp * RPW + i);
    const KeyRange blk = block_keys(a, n_kv, row0, QR);  // uniform across the block

    float m[RPW], l[RPW], acc[RPW][kDSlots];
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int k = 0; k < kDSlots; ++k) acc[i][k] = 0.f;
    }
    __syncthreads();

    const int64_t kv_begin = static_cast<int64_t>(split) * split_len;
    const int64_t kv_end = min(n_kv, kv_begin + split_len);
    const float* qw = qs + warp * RPW * D;
    float* pw = ps + warp * RPW * kKT;

    int64_t seg_start = 0;
    for (int si = 0; si < a.n_segs && seg_start < kv_end; ++si) {
        CudaKVSegment seg = segs[si];
        if (own >= 0 && si == a.n_segs - 1) seg.n_tokens = own;
        const int64_t seg_end = seg_start + seg.n_tokens;
        const int64_t j_begin = max(max(seg_start, kv_begin), blk.lo);
        const int64_t j_end = min(min(seg_end, kv_end), blk.hi + 1);
        const uint8_t* kbase = static_cast<const uint8_t*>(seg.k) + hk * seg.k_head_stride;
        const uint8_t* vbase = static_cast<const uint8_t*>(seg.v) + hk * seg.v_head_stride;
        for (int64_t j0 = j_begin; j0 < j_end; j0 += kKT) {
            const int nk = static_cast<int>(min(static_cast<int64_t>(kKT), j_end - j0));
            load_tile_any<kKT>(seg.k_type, kbase, seg.k_tok_stride, j0 - seg_start, nk, D, D, D + 1, kv);
            __syncthreads();

            float sc[RPW];  // key `lane` against the warp's rows
            key_scores<RPW>(qw, kv + lane * DP, D, sc);
            const int64_t j = j0 + lane;
#pragma unroll
            for (int i = 0; i < RPW; ++i) {
                const bool visible = lane < nk && j >= vis[i].lo && j <= vis[i].hi;
                const float s = visible ? sc[i] : -INFINITY;
                const float m_new = fmaxf(m[i], warp_max(s));
                // All-masked so far: keep the state empty (exp2(-inf - -inf) would be NaN).
                const float p = m_new == -INFINITY ? 0.f : exp2f(s - m_new);
                const float alpha = m_new == -INFINITY ? 1.f : exp2f(m[i] - m_new);
                l[i] = l[i] * alpha + warp_sum(p);
                m[i] = m_new;
#pragma unroll
                for (int k = 0; k < kDSlots; ++k) acc[i][k] *= alpha;
                pw[i * kKT + lane] = p;
            }
            __syncthreads();  // K tile fully read

            load_tile_any<kKT>(seg.v_type, vbase, seg.v_tok_stride, j0 - seg_start, nk, D, D, D + 1, kv);
            __syncthreads();
            for (int jj = 0; jj < nk; ++jj) {
                const float* vrow = kv + jj * DP;
                float p[RPW];
#pragma unroll
                for (int i = 0; i < RPW; ++i) p[i] = pw[i * kKT + jj];
#pragma unroll
                for (int k = 0; k < kDSlots; ++k) {
                    const int d = lane + 32 * k;
                    if (d < D) {
                        const float vd = vrow[d];
#pragma unroll
                        for (int i = 0; i < RPW; ++i) acc[i][k] += p[i] * vd;
                    }
                }
            }
            __syncthreads();  // V tile and probabilities fully read before the next tile
        }
        seg_start = seg_end;
    }

#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        const int gr = row0 + warp * RPW + i;
        if (gr >= rows) continue;
        const int t = gr / a.n_rep, h = hk * a.n_rep + gr % a.n_rep;
        if (a.n_splits == 1) {
            const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
            float* o = out + static_cast<int64_t>(t) * a.out_tok_stride + static_cast<int64_t>(h) * D;
#pragma unroll
            for (int k = 0; k < kDSlots; ++k) {
                const int d = lane + 32 * k;
                if (d < D) o[d] = acc[i][k] * inv;
            }
            if (a.lse && lane == 0) a.lse[static_cast<int64_t>(t) * a.n_head + h] = l[i] > 0.f ? m[i] + log2f(l[i]) : -INFINITY;
        } else {
            const size_t slot = static_cast<size_t>(split) * a.n_q * a.n_head + static_cast<size_t>(t) * a.n_head + h;
            float* o = a.ws_acc + slot * D;
#pragma unroll
            for (int k = 0; k < kDSlots; ++k) {
                const int d = lane + 32 * k;
                if (d < D) o[d] = acc[i][k];
            }
            if (lane == 0) {
                a.ws_ml[2 * slot] = m[i];
                a.ws_ml[2 * slot + 1] = l[i];
            }
        }
    }
}

// ---------------------------------------------------------------- tensor cores

constexpr int kTcRows = 64;     // query rows per block: 16 per warp
constexpr int kTcKeys = 64;     // keys per tile
constexpr int kTcMaxDim = 128;  // head_dim (padded to a multiple of 16) the shared memory is sized for
constexpr int kTcSLd = kTcKeys + 4;   // floats per score row
constexpr int kTcPLd = 2 * kTcSLd;    // halves per probability row: P overwrites its own score row

// Shared memory of attn_tc_kernel for head_dim D, in bytes from the (32-byte aligned) base.
struct TcLayout {
    int dp, ldh, ldo;  // D padded to 16; halves per Q/K/V row; floats per O row
    size_t q, kv, s, o, stats, total;
};
__host__ __device__ inline TcLayout tc_layout(int D) {
    TcLayout t;
    t.dp = (D + 15) / 16 * 16;
    t.ldh = t.dp + 8;  // 16-byte multiple that staggers banks
    t.ldo = t.dp + 4;
    t.q = 0;
    t.kv = t.q + sizeof(__half) * kTcRows * t.ldh;
    t.s = t.kv + sizeof(__half) * kTcKeys * t.ldh;
    t.o = t.s + sizeof(float) * kTcRows * kTcSLd;
    t.stats = t.o + sizeof(float) * kTcRows * t.ldo;
    t.total = t.stats + sizeof(float) * 3 * kTcRows;
    return t;
}

// grid (1, ceil(n_q * n_rep / kTcRows), n_kv_head * n_batch), block kAttnThreads (4 warps), dynamic shared
// memory tc_layout(head_dim).total. Warp w owns query rows 16w..16w+15 of the block; a.n_splits == 1.
__global__ void __launch_bounds__(kAttnThreads) attn_tc_kernel(AttnArgs a) {
    using namespace nvcuda;
    extern __shared__ __align__(32) float tc_smem[];
    const int D = a.head_dim;
    const TcLayout L = tc_layout(D);
    unsigned char* base = reinterpret_cast<unsigned char*>(tc_smem);
    __half* qs = reinterpret_cast<__half*>(base + L.q);   // [64][ldh] scaled queries
    __half* kv = reinterpret_cast<__half*>(base + L.kv);  // [64][ldh] the K tile, then the V tile
    float* sf = reinterpret_cast<float*>(base + L.s);     // [64][kTcSLd] scores; row r's P over its start
    __half* ps = reinterpret_cast<__half*>(sf);           // [64][kTcPLd]
    float* os = reinterpret_cast<float*>(base + L.o);     // [64][ldo] unnormalised outputs
    float* m_s = reinterpret_cast<float*>(base + L.stats);  // [64] running max (log2 domain)
    float* l_s = m_s + kTcRows;                             // [64] running sum
    float* al_s = l_s + kTcRows;                            // [64] this tile's rescale factor

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hk = blockIdx.z % a.n_kv_head, batch = blockIdx.z / a.n_kv_head;
    const float* q = a.q + batch * a.q_batch_stride;
    float* out = a.out + batch * a.out_batch_stride;
    const CudaKVSegment* segs = a.segs + static_cast<int64_t>(batch) * a.n_segs;
    const int64_t n_kv = a.n_kv;
    const int rows = a.n_q * a.n_rep;
    const int row0 = blockIdx.y * kTcRows;
    const int dp = L.dp, ldh = L.ldh, ldo = L.ldo;

    for (int i = threadIdx.x; i < kTcRows * dp; i += kAttnThreads) {
        const int r = i / dp, d = i - r * dp, gr = row0 + r;
        float val = 0.f;
        if (gr < rows && d < D) {
            const int t = gr / a.n_rep, h = hk * a.n_rep + gr % a.n_rep;
            val = q[static_cast<int64_t>(t) * a.q_tok_stride + static_cast<int64_t>(h) * D + d] * a.scale_log2;
        }
        qs[r * ldh + d] = to_half_sat(val);
        os[r * ldo + d] = 0.f;
    }
    for (int i = threadIdx.x; i < kTcRows; i += kAttnThreads) {
        m_s[i] = -INFINITY;
        l_s[i] = 0.f;
    }
    const KeyRange blk = block_keys(a, n_kv, row0, kTcRows);
    __syncthreads();

    const int wr = warp * 16;  // this warp's first row
    int64_t seg_start = 0;
    for (int si = 0; si < a.n_segs && seg_start < n_kv; ++si) {
        const CudaKVSegment seg = segs[si];
        const int64_t seg_end = seg_start + seg.n_tokens;
        const int64_t j_begin = max(seg_start, blk.lo);
        const int64_t j_end = min(min(seg_end, n_kv), blk.hi + 1);
        const uint8_t* kbase = static_cast<const uint8_t*>(seg.k) + hk * seg.k_head_stride;
        const uint8_t* vbase = static_cast<const uint8_t*>(seg.v) + hk * seg.v_head_stride;
        for (int64_t j0 = j_begin; j0 < j_end; j0 += kTcKeys) {
            const int nk = static_cast<int>(min(static_cast<int64_t>(kTcKeys), j_end - j0));
            load_tile_any<kTcKeys>(seg.k_type, kbase, seg.k_tok_stride, j0 - seg_start, nk, D, dp, ldh, kv);
            __syncthreads();

            // S = Q K^T for the warp's 16 rows x 64 keys (K^T is the column-major view of the K tile).
            for (int n = 0; n < kTcKeys / 16; ++n) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::fill_fragment(acc, 0.f);
                for (int kk = 0; kk < dp; kk += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
                    wmma::load_matrix_sync(fa, qs + wr * ldh + kk, ldh);
                    wmma::load_matrix_sync(fb, kv + 16 * n * ldh + kk, ldh);
                    wmma::mma_sync(acc, fa, fb, acc);
                }
                wmma::store_matrix_sync(sf + wr * kTcSLd + 16 * n, acc, kTcSLd, wmma::mem_row_major);
            }
            __syncwarp();

            // Online softmax of the warp's rows: lane j takes keys j and j + 32.
            for (int i = 0; i < 16; ++i) {
                const int r = wr + i, gr = row0 + r;
                float s0 = -INFINITY, s1 = -INFINITY;
                const KeyRange vis = row_keys(a, n_kv, gr);
                const int64_t ja = j0 + lane, jb = ja + 32;
                if (lane < nk && ja >= vis.lo && ja <= vis.hi) s0 = sf[r * kTcSLd + lane];
                if (lane + 32 < nk && jb >= vis.lo && jb <= vis.hi) s1 = sf[r * kTcSLd + lane + 32];
                const float m_old = m_s[r];
                const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));  // every lane has read row r by here
                const float p0 = m_new == -INFINITY ? 0.f : exp2f(s0 - m_new);
                const float p1 = m_new == -INFINITY ? 0.f : exp2f(s1 - m_new);
                const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_old - m_new);
                const float sum = warp_sum(p0 + p1);
                ps[r * kTcPLd + lane] = __float2half_rn(p0);
                ps[r * kTcPLd + lane + 32] = __float2half_rn(p1);
                if (lane == 0) {
                    m_s[r] = m_new;
                    l_s[r] = l_s[r] * alpha + sum;
                    al_s[r] = alpha;
                }
            }
            __syncwarp();
            for (int i = 0; i < 16; ++i) {
                const float alpha = al_s[wr + i];
                for (int d = lane; d < dp; d += 32) os[(wr + i) * ldo + d] *= alpha;
            }
            __syncthreads();  // every warp is done with the K tile

            load_tile_any<kTcKeys>(seg.v_type, vbase, seg.v_tok_stride, j0 - seg_start, nk, D, dp, ldh, kv);
            __syncthreads();
            // O += P V for the warp's 16 rows (rows of V past nk are zero, and so are their P columns).
            for (int n = 0; n < dp / 16; ++n) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::load_matrix_sync(acc, os + wr * ldo + 16 * n, ldo, wmma::mem_row_major);
                for (int kk = 0; kk < kTcKeys; kk += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
                    wmma::load_matrix_sync(fa, ps + wr * kTcPLd + kk, kTcPLd);
                    wmma::load_matrix_sync(fb, kv + kk * ldh + 16 * n, ldh);
                    wmma::mma_sync(acc, fa, fb, acc);
                }
                wmma::store_matrix_sync(os + wr * ldo + 16 * n, acc, ldo, wmma::mem_row_major);
            }
            __syncthreads();  // the V tile, P and O are read before the next tile overwrites them
        }
        seg_start = seg_end;
    }

    for (int i = 0; i < 16; ++i) {
        const int r = wr + i, gr = row0 + r;
        if (gr >= rows) continue;
        const int t = gr / a.n_rep, h = hk * a.n_rep + gr % a.n_rep;
        const float l = l_s[r];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        float* o = out + static_cast<int64_t>(t) * a.out_tok_stride + static_cast<int64_t>(h) * D;
        for (int d = lane; d < D; d += 32) o[d] = os[r * ldo + d] * inv;
        if (a.lse && lane == 0) a.lse[static_cast<int64_t>(t) * a.n_head + h] = l > 0.f ? m_s[r] + log2f(l) : -INFINITY;
    }
}

// Log-sum-exp only, on the f32 scores of attn_kernel (same scaled queries, same summation order): the
// rows that vote when the output comes from the tensor cores. grid (1, ceil(n_rows / QR), n_kv_head)
// for the KV head's query rows [row_begin, row_begin + n_rows), block kAttnThreads, dynamic shared
// memory (QR * D + kKT * (D + 1)) floats. Without V there is nothing to rescale per tile: each lane keeps
// a running max and sum over the keys it scores, and the warp merges them once at the end.
template <int RPW>
__global__ void __launch_bounds__(kAttnThreads) attn_lse_kernel(AttnArgs a, int row_begin) {
    constexpr int QR = kAttnWarps * RPW;
    extern __shared__ float smem[];
    const int D = a.head_dim, DP = D + 1;
    float* qs = smem;         // [QR][D]
    float* kt = qs + QR * D;  // [kKT][D + 1]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, hk = blockIdx.z;
    const int64_t n_kv = a.n_kv;
    const int rows = a.n_q * a.n_rep;
    const int row0 = row_begin + blockIdx.y * QR;

    load_scaled_queries(a, a.q, row0, hk, QR, qs);
    KeyRange vis[RPW];
    float m[RPW], l[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        vis[i] = row_keys(a, n_kv, row0 + warp * RPW + i);
        m[i] = -INFINITY;
        l[i] = 0.f;
    }
    const KeyRange blk = block_keys(a, n_kv, row0, QR);
    __syncthreads();

    const float* qw = qs + warp * RPW * D;
    int64_t seg_start = 0;
    for (int si = 0; si < a.n_segs && seg_start < n_kv; ++si) {
        const CudaKVSegment seg = a.segs[si];
        const int64_t seg_end = seg_start + seg.n_tokens;
        const int64_t j_begin = max(seg_start, blk.lo);
        const int64_t j_end = min(min(seg_end, n_kv), blk.hi + 1);
        const uint8_t* kbase = static_cast<const uint8_t*>(seg.k) + hk * seg.k_head_stride;
        for (int64_t j0 = j_begin; j0 < j_end; j0 += kKT) {
            const int nk = static_cast<int>(min(static_cast<int64_t>(kKT), j_end - j0));
            load_tile_any<kKT>(seg.k_type, kbase, seg.k_tok_stride, j0 - seg_start, nk, D, D, D + 1, kt);
            __syncthreads();
            float sc[RPW];
            key_scores<RPW>(qw, kt + lane * DP, D, sc);
            const int64_t j = j0 + lane;
#pragma unroll
            for (int i = 0; i < RPW; ++i) {
                if (lane >= nk || j < vis[i].lo || j > vis[i].hi) continue;
                if (sc[i] > m[i]) {  // from -inf: l is 0, and 0 * exp2(-inf) is 0
                    l[i] = l[i] * exp2f(m[i] - sc[i]) + 1.f;
                    m[i] = sc[i];
                } else {
                    l[i] += exp2f(sc[i] - m[i]);
                }
            }
            __syncthreads();  // the K tile is read
        }
        seg_start = seg_end;
    }
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        const int gr = row0 + warp * RPW + i;
        const float M = warp_max(m[i]);
        const float L = warp_sum(m[i] == -INFINITY ? 0.f : l[i] * exp2f(m[i] - M));
        if (gr < rows && lane == 0) {
            const int t = gr / a.n_rep, h = hk * a.n_rep + gr % a.n_rep;
            a.lse[static_cast<int64_t>(t) * a.n_head + h] = L > 0.f ? M + log2f(L) : -INFINITY;
        }
    }
}

// Attention observation (X²L compression votes). grid (ceil(n_own / kKT), n_kv_head), block kAttnThreads.
// Block (tile, hk) owns entries [tile * kKT, +kKT) of KV head hk's own segment and adds to each the
// probabilities exp2(q·k * scale_log2 - lse) of every observed query row of that KV head that sees it
// (query t sits at own index n_own - n_q + t), or with max_pool keeps the largest of them and of the
// vote already there. Warps take query rows in turn; lane j scores entry j.
struct VotesArgs {
    const float* q;
    int64_t q_tok_stride;
    const float* lse;  // [n_q, n_head]
    CudaKVSegment own;
    int64_t n_own;
    int n_q, n_head, n_rep, head_dim, obs_from;
    float scale_log2;
    float* votes;      // [n_kv_head, votes_stride]
    int64_t votes_stride;
    bool max_pool;
};

__global__ void __launch_bounds__(kAttnThreads) attn_votes_kernel(VotesArgs a) {
    extern __shared__ float smem[];
    const int D = a.head_dim, DP = D + 1;
    float* kt = smem;             // [kKT][D + 1]
    float* part = kt + kKT * DP;  // [kAttnWarps][kKT]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, hk = blockIdx.y;
    const int64_t e0 = static_cast<int64_t>(blockIdx.x) * kKT;
    const int nk = static_cast<int>(min(static_cast<int64_t>(kKT), a.n_own - e0));
    load_tile_any<kKT>(a.own.k_type, static_cast<const uint8_t*>(a.own.k) + hk * a.own.k_head_stride, a.own.k_tok_stride,
                       e0, nk, D, D, D + 1, kt);
    __syncthreads();
    const int64_t q_base = a.n_own - a.n_q;  // own index of query 0
    // Queries before t_first see none of this tile's entries.
    const int t_first = static_cast<int>(max(static_cast<int64_t>(a.obs_from), e0 - q_base));
    const int64_t e = e0 + lane;
    const float* krow = kt + lane * DP;
    float acc = 0.f;
    for (int r = t_first * a.n_rep + warp; r < a.n_q * a.n_rep; r += kAttnWarps) {
        const int t = r / a.n_rep, h = hk * a.n_rep + r % a.n_rep;
        const float* qr = a.q + static_cast<int64_t>(t) * a.q_tok_stride + static_cast<int64_t>(h) * D;
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += qr[d] * krow[d];
        if (lane < nk && e <= q_base + t) {
            const float p = exp2f(dot * a.scale_log2 - a.lse[static_cast<int64_t>(t) * a.n_head + h]);
            acc = a.max_pool ? fmaxf(acc, p) : acc + p;
        }
    }
    part[warp * kKT + lane] = acc;
    __syncthreads();
    if (warp == 0 && lane < nk) {
        float v = a.votes[hk * a.votes_stride + e];
        for (int w = 0; w < kAttnWarps; ++w) v = a.max_pool ? fmaxf(v, part[w * kKT + lane]) : v + part[w * kKT + lane];
        a.votes[hk * a.votes_stride + e] = v;
    }
}

// Merge split states: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s. grid n_q * n_head.
__global__ void attn_combine_kernel(const float* __restrict__ ws_acc, const float* __restrict__ ws_ml, int n_splits,
                                    int n_q, int n_head, int D, float* __restrict__ out, int64_t out_tok_stride) {
    const int row = blockIdx.x;  // t * n_head + h
    const size_t n_rows = static_cast<size_t>(n_q) * n_head;
    float M = -INFINITY;
    for (int s = 0; s < n_splits; ++s) M = fmaxf(M, ws_ml[2 * (s * n_rows + row)]);
    float L = 0.f;
    for (int s = 0; s < n_splits; ++s) {
        const float ms = ws_ml[2 * (s * n_rows + row)];
        if (ms != -INFINITY) L += exp2f(ms - M) * ws_ml[2 * (s * n_rows + row) + 1];
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    const int t = row / n_head, h = row % n_head;
    float* o = out + static_cast<int64_t>(t) * out_tok_stride + static_cast<int64_t>(h) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < n_splits; ++s) {
            const float ms = ws_ml[2 * (s * n_rows + row)];
            if (ms != -INFINITY) acc += exp2f(ms - M) * ws_acc[(s * n_rows + row) * D + d];
        }
        o[d] = acc * inv;
    }
}

size_t smem_bytes(int rpw, int D) {
    const int qr = kAttnWarps * rpw;
    return sizeof(float) * (static_cast<size_t>(qr) * D + static_cast<size_t>(kKT) * (D + 1) + qr * kKT);
}

// False when this device cannot give the block its shared memory (the caller takes fewer rows).
template <int RPW>
bool launch_attn(const AttnArgs& a, dim3 grid, cudaStream_t s) {
    const size_t smem = smem_bytes(RPW, a.head_dim);
    // Above 48 KB (RPW 4 at head_dim > 184) the kernel opts in, up to the device's limit.
    if (!allow_dynamic_smem(reinterpret_cast<const void*>(attn_kernel<RPW>), smem, "cudaFuncSetAttribute(attn_kernel)"))
        return false;
    attn_kernel<RPW><<<grid, kAttnThreads, smem, s>>>(a);
    check_launch("attn_kernel");
    return true;
}

// The softmax scale times log2(e) (scores are exponentiated base 2); scale 0 = 1/sqrt(head_dim). The
// attention kernel and the votes that read its log-sum-exp must use the same value.
float scale_log2(float scale, int head_dim) {
    return (scale > 0.f ? scale : 1.f / std::sqrt(static_cast<float>(head_dim))) * 1.4426950408889634f;
}

int kv_align(uint32_t type) {
    switch (type) {
        case kF32: return Fmt<kF32>::ALIGN;
        case kF16: return Fmt<kF16>::ALIGN;
        case kQ8_0: return Fmt<kQ8_0>::ALIGN;
        case kQ4_0: return Fmt<kQ4_0>::ALIGN;
        default: return 0;
    }
}

int kv_block(uint32_t type) {
    switch (type) {
        case kF32: return Fmt<kF32>::QK;
        case kF16: return Fmt<kF16>::QK;
        case kQ8_0: return Fmt<kQ8_0>::QK;
        case kQ4_0: return Fmt<kQ4_0>::QK;
        default: return 0;
    }
}

}  // namespace
}  // namespace cudak

using namespace cudak;

bool cuda_kv_type_supported(DType t) { return kv_align(static_cast<uint32_t>(t)) != 0; }

void CudaSegmentTable::assign(const std::vector<CudaKVSegment>& segs, int head_dim, void* stream) {
    const char* fn = "CudaSegmentTable::assign";
    if (head_dim <= 0 || head_dim > kMaxHeadDim) throw_arg(fn, "head_dim must be in 1..256");
    int64_t total = 0;
    for (size_t i = 0; i < segs.size(); ++i) {
        const CudaKVSegment& s = segs[i];
        const std::string where = " (segment " + std::to_string(i) + ")";
        if (s.n_tokens < 0) throw Error(std::string(fn) + ": negative n_tokens" + where);
        for (int kv = 0; kv < 2; ++kv) {
            const uint32_t type = kv ? s.v_type : s.k_type;
            const void* p = kv ? s.v : s.k;
            const int64_t ts = kv ? s.v_tok_stride : s.k_tok_stride, hs = kv ? s.v_head_stride : s.k_head_stride;
            const int al = kv_align(type);
            if (al == 0) throw Error(std::string(fn) + ": KV type must be f32, f16, q8_0 or q4_0" + where);
            if (head_dim % kv_block(type) != 0)
                throw Error(std::string(fn) + ": head_dim is not a multiple of the KV type's block" + where);
            if (s.n_tokens == 0) continue;
            if (!p) throw Error(std::string(fn) + ": null K/V pointer" + where);
            if (!aligned(p, al) || ts % al != 0 || hs % al != 0)
                throw Error(std::string(fn) + ": K/V pointer or stride misaligned for its type" + where);
        }
        total += s.n_tokens;
    }
    const size_t bytes = segs.size() * sizeof(CudaKVSegment);
    // The same table on the same stream is on the device already (a question's layers keep theirs).
    const bool same = uploaded_ && uploaded_on_ == stream && segs.size() == host_.size() &&
                      (bytes == 0 || std::memcmp(segs.data(), host_.data(), bytes) == 0);
    host_ = segs;
    n_kv_ = total;
    if (same) return;
    if (bytes > dev_.size()) dev_ = CudaDeviceBuffer(bytes);
    staging_.upload(dev_.data(), host_.data(), bytes, stream);
    uploaded_ = true;
    uploaded_on_ = stream;
}

void CudaSegmentTable::reserve(int n) {
    const size_t bytes = static_cast<size_t>(std::max(n, 0)) * sizeof(CudaKVSegment);
    if (bytes > dev_.size()) {
        dev_ = CudaDeviceBuffer(bytes);
        uploaded_ = false;
    }
}

size_t cuda_attention_workspace_bytes(int n_q, int n_head, int head_dim, int n_splits) {
    if (n_splits <= 1) return 0;
    return sizeof(float) * static_cast<size_t>(n_splits) * n_q * n_head * (head_dim + 2);
}

void cuda_attention(const CudaAttentionParams& p, void* stream) {
    const char* fn = "cuda_attention";
    if (p.n_q < 0 || p.n_head <= 0 || p.n_kv_head <= 0 || p.n_head % p.n_kv_head != 0)
        throw_arg(fn, "need n_head > 0 and a multiple of n_kv_head > 0");
    if (p.head_dim <= 0 || p.head_dim > kMaxHeadDim || p.head_dim % 4 != 0)
        throw_arg(fn, "head_dim must be a multiple of 4 in 4..256");
    if (p.n_kv < 0 || p.n_segments < 0 || (p.n_segments > 0 && !p.segments)) throw_arg(fn, "bad segments");
    if (p.own_len && (p.n_segments < 1 || p.own_max < p.n_q || p.own_max > p.n_kv || p.lse))
        throw_arg(fn, "own_len needs a segment for the own entries, n_q <= own_max <= n_kv and no lse");
    if (p.n_batch < 1 || (p.n_batch > 1 && (p.lse || p.own_len)))
        throw_arg(fn, "n_batch must be >= 1, and batched problems take no lse or own_len");
    if (p.lse_from < 0 || p.lse_from > p.n_q) throw_arg(fn, "lse_from must be in 0..n_q");
    if (p.n_q == 0) return;
    const int n_rep = p.n_head / p.n_kv_head;
    const int64_t rows = static_cast<int64_t>(p.n_q) * n_rep;
    const int rpw = rows <= kAttnWarps ? 1 : 4;
    const int qr = kAttnWarps * rpw;
    const int64_t row_tiles = (rows + qr - 1) / qr;
    if (row_tiles > 65535 || static_cast<int64_t>(p.n_kv_head) * p.n_batch > 65535)
        throw_arg(fn, "too many query rows or problems for one launch");
    const cudaStream_t s = as_stream(stream);

    AttnArgs a{};
    a.q = p.q;
    a.q_tok_stride = p.q_tok_stride ? p.q_tok_stride : static_cast<int64_t>(p.n_head) * p.head_dim;
    a.out = p.out;
    a.out_tok_stride = p.out_tok_stride ? p.out_tok_stride : static_cast<int64_t>(p.n_head) * p.head_dim;
    a.segs = p.segments;
    a.n_segs = p.n_segments;
    a.n_q = p.n_q;
    a.n_head = p.n_head;
    a.n_kv_head = p.n_kv_head;
    a.head_dim = p.head_dim;
    a.n_rep = n_rep;
    a.n_kv = p.n_kv;
    a.scale_log2 = scale_log2(p.scale, p.head_dim);
    a.causal = p.causal ? 1 : 0;
    a.window = p.window;
    a.lse = p.lse;
    a.own_len = p.own_len;
    a.own_max = p.own_max;
    a.q_batch_stride = p.q_batch_stride;
    a.out_batch_stride = p.out_batch_stride;

    using Kernel = CudaAttentionParams::Kernel;
    const bool tc_shape_ok = p.head_dim <= kTcMaxDim && !p.own_len;
    if (p.kernel == Kernel::TensorCore && !tc_shape_ok) throw_arg(fn, "the tensor-core kernel needs head_dim <= 128 and no own_len");
    // The tensor-core block holds 64 query rows' Q, O and scores plus a 64-key tile: 86.8 KB at head_dim
    // 128 (docs/cuda.md). A device whose opt-in limit is lower (sm_75: 64 KB) takes the f32 kernel.
    const bool tc_fits = tc_shape_ok && allow_dynamic_smem(reinterpret_cast<const void*>(attn_tc_kernel),
                                                           tc_layout(p.head_dim).total, "cudaFuncSetAttribute(attn_tc_kernel)");
    if (p.kernel == Kernel::TensorCore && !tc_fits) throw_arg(fn, "the tensor-core kernel's shared memory exceeds this device's limit");
    if (p.kernel == Kernel::TensorCore || (p.kernel == Kernel::Auto && tc_fits && rows >= kTcRows)) {
        const int64_t tiles = (rows + kTcRows - 1) / kTcRows;
        if (tiles > 65535) throw_arg(fn, "too many query rows for one launch");
        a.n_splits = 1;
        a.split_len = std::max<int64_t>(p.n_kv, 1);
        const size_t smem = tc_layout(p.head_dim).total;
        // Auto takes the log-sum-exp (the X²L votes) from f32 scores: the tensor cores' f16 scores move it
        // by ~1e-3, enough to flip near-tied entries of the compression's selection. A second pass scores
        // the voting rows again in f32 for it (QK^T without V: about half the f32 kernel's work).
        const bool exact_lse = p.lse && p.kernel == Kernel::Auto;
        if (exact_lse) a.lse = nullptr;
        const dim3 grid(1, static_cast<unsigned>(tiles), static_cast<unsigned>(static_cast<int64_t>(p.n_kv_head) * p.n_batch));
        attn_tc_kernel<<<grid, kAttnThreads, smem, s>>>(a);
        check_launch("attn_tc_kernel");
        const int64_t lse_row0 = static_cast<int64_t>(p.lse_from) * n_rep, lse_rows = rows - lse_row0;
        if (exact_lse && lse_rows > 0) {
            constexpr int kLseRpw = 8, kLseQr = kAttnWarps * kLseRpw;
            a.lse = p.lse;
            const size_t lse_smem = sizeof(float) * (static_cast<size_t>(kLseQr) * p.head_dim + kKT * (p.head_dim + 1));
            const dim3 lgrid(1, static_cast<unsigned>((lse_rows + kLseQr - 1) / kLseQr), static_cast<unsigned>(p.n_kv_head));
            attn_lse_kernel<kLseRpw><<<lgrid, kAttnThreads, lse_smem, s>>>(a, static_cast<int>(lse_row0));
            check_launch("attn_lse_kernel");
        }
        return;
    }

    // Splits: enough blocks to fill the device when rows alone do not, each split >= 4 tiles of keys.
    const int64_t base_blocks = row_tiles * p.n_kv_head;
    // The log-sum-exp is written by the unsplit kernel; batched problems fill the device by themselves.
    int64_t splits = p.lse || p.n_batch > 1 ? 1 : p.n_splits;
    if (splits <= 0) {
        int dev = 0, sms = 1;
        check(cudaGetDevice(&dev), "cudaGetDevice");
        check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
        splits = base_blocks >= sms ? 1 : (2 * sms + base_blocks - 1) / base_blocks;
        splits = std::min<int64_t>(splits, (p.n_kv + 4 * kKT - 1) / (4 * kKT));
    }
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, kMaxSplits));
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, (p.n_kv + kKT - 1) / kKT));
    while (splits > 1 && cuda_attention_workspace_bytes(p.n_q, p.n_head, p.head_dim, static_cast<int>(splits)) >
                             (p.workspace ? p.workspace_bytes : 0))
        --splits;
    int64_t split_len = p.n_kv;
    if (splits > 1) {
        split_len = (p.n_kv + splits - 1) / splits;
        split_len = (split_len + kKT - 1) / kKT * kKT;
        splits = (p.n_kv + split_len - 1) / split_len;  // rounding may leave fewer non-empty splits
    }
    a.n_splits = static_cast<int>(splits);
    a.split_len = std::max<int64_t>(split_len, 1);
    if (splits > 1) {
        a.ws_acc = static_cast<float*>(p.workspace);
        a.ws_ml = a.ws_acc + static_cast<size_t>(splits) * p.n_q * p.n_head * p.head_dim;
    }

    dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(row_tiles),
                    static_cast<unsigned>(static_cast<int64_t>(p.n_kv_head) * p.n_batch));
    if (rpw == 1 || !launch_attn<4>(a, grid, s)) {
        if (rpw != 1) {  // 4 rows per warp do not fit this device's shared memory: 1 row per warp, 4x the tiles
            if (row_tiles * 4 > 65535) throw_arg(fn, "too many query rows for one launch on this device");
            grid.y = static_cast<unsigned>((rows + kAttnWarps - 1) / kAttnWarps);
        }
        if (!launch_attn<1>(a, grid, s)) throw_arg(fn, "head_dim too large for this device's shared memory");
    }

    if (splits > 1) {
        const int threads = std::min(256, (p.head_dim + 31) / 32 * 32);
        attn_combine_kernel<<<static_cast<unsigned>(static_cast<int64_t>(p.n_q) * p.n_head), threads, 0, s>>>(
            a.ws_acc, a.ws_ml, a.n_splits, p.n_q, p.n_head, p.head_dim, p.out, a.out_tok_stride);
        check_launch("attn_combine_kernel");
    }
}

void cuda_attention_votes(const float* q, int64_t q_tok_stride, const float* lse, int n_q, int n_head, int n_kv_head,
                          int head_dim, float scale, const CudaKVSegment& own, int64_t n_own, int obs_from, float* votes,
                          int64_t votes_stride, void* stream, bool max_pool) {
    const char* fn = "cuda_attention_votes";
    if (n_q < 0 || n_head <= 0 || n_kv_head <= 0 || n_head % n_kv_head != 0) throw_arg(fn, "bad head counts");
    if (head_dim <= 0 || head_dim > kMaxHeadDim) throw_arg(fn, "head_dim must be in 1..256");
    if (n_own < n_q || votes_stride < n_own) throw_arg(fn, "need n_q <= n_own <= votes_stride");
    if (obs_from < 0) throw_arg(fn, "obs_from must be >= 0");
    const int al = kv_align(own.k_type);
    if (al == 0 || head_dim % kv_block(own.k_type) != 0) throw_arg(fn, "unsupported key type for this head_dim");
    if (!aligned(own.k, al) || own.k_tok_stride % al != 0 || own.k_head_stride % al != 0) throw_arg(fn, "misaligned keys");
    if (n_q == 0 || n_own == 0 || obs_from >= n_q) return;
    const int64_t tiles = (n_own + kKT - 1) / kKT;
    if (tiles > 0x7FFFFFFF || n_kv_head > 65535) throw_arg(fn, "too many entries for one launch");
    VotesArgs a{};
    a.q = q;
    a.q_tok_stride = q_tok_stride ? q_tok_stride : static_cast<int64_t>(n_head) * head_dim;
    a.lse = lse;
    a.own = own;
    a.n_own = n_own;
    a.n_q = n_q;
    a.n_head = n_head;
    a.n_rep = n_head / n_kv_head;
    a.head_dim = head_dim;
    a.obs_from = obs_from;
    a.scale_log2 = scale_log2(scale, head_dim);
    a.votes = votes;
    a.votes_stride = votes_stride;
    a.max_pool = max_pool;
    const size_t smem = sizeof(float) * (kKT * (head_dim + 1) + kAttnWarps * kKT);
    attn_votes_kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(n_kv_head)), kAttnThreads, smem,
                        as_stream(stream)>>>(a);
    check_launch("attn_votes_kernel");
}

void cuda_attention(CudaAttentionParams p, const CudaSegmentTable& table, void* stream) {
    p.segments = table.device_data();
    p.n_segments = table.size();
    p.n_kv = table.n_kv();
    cuda_attention(p, stream);
}

}  // namespace x2l
