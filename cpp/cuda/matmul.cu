// Quantized matmul y[T, rows] = x[T, n] · W^T with in-kernel dequantization, and row gathers.
//
// Two kernels per weight format:
// - matvec (T <= 8, decode): one warp per weight row; lane i reads units i, i+32, ... so a warp
//   streams a contiguous run of the row; up to kMvTokens tokens reuse each dequantized unit.
// - tiled (T > 8): a 64 tokens x 64 rows block tile, K steps of 64 values; the weight tile is
//   dequantized once into shared memory and reused by all 64 tokens. Two variants: tensor cores
//   (T >= kTcMinT, the prefill: tiles converted to f16, WMMA 16x16x16 products accumulated in f32,
//   as cuBLAS-backed f16 GEMMs do) and f32 FMA (short batches, and the reference the tests hold the
//   tensor-core kernel to).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "core/common.h"
#include "cuda/common.cuh"
#include "cuda/formats.cuh"
#include "cuda/backend.h"

namespace x2l {
namespace cudak {
namespace {

constexpr int kMvWarps = 4;   // weight rows per matvec block
constexpr int kMvTokens = 4;  // tokens per matvec pass
constexpr int kMvMaxT = 8;    // above this many tokens the tiled kernel wins (weights read once)

constexpr int kTileM = 64;    // tokens per tiled block
constexpr int kTileN = 64;    // weight rows per tiled block
constexpr int kTileK = 64;    // values per K step (every format's units tile it exactly)
constexpr int kTileThreads = 256;

constexpr int kTcMinT = 64;   // tokens from which the tensor-core kernel is used (a full token tile)
constexpr int kTcThreads = 128;  // 4 warps in 2 x 2, each 32 tokens x 32 rows = 2 x 2 WMMA tiles
constexpr int kTcLd = kTileK + 8;  // halves per shared row: 144 bytes, a multiple of 16 that staggers banks
constexpr int kTcOutLd = kTileN + 4;  // floats per row of the epilogue's staging tile

// Dot of one unit's values with x at the unit's positions (x 16-byte aligned at every group start).
template <typename F>
__device__ __forceinline__ float dot_unit(const float* v, const float* xp) {
    float s = 0.f;
#pragma unroll
    for (int g = 0; g < F::NG; ++g) {
#pragma unroll
        for (int c = 0; c < F::G / 4; ++c) {
            const float4 a = *reinterpret_cast<const float4*>(xp + g * F::GAP + 4 * c);
            const float* w = v + g * F::G + 4 * c;
            s += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w;
        }
    }
    return s;
}

// The tiled kernels' loads. x[t, k .. k+4), zeros past the last token or the row's end (n % 4 == 0).
__device__ __forceinline__ float4 load_x4(const float* __restrict__ x, int64_t n, int n_tokens, int t, int64_t k) {
    if (t < n_tokens && k < n) return *reinterpret_cast<const float4*>(x + static_cast<size_t>(t) * n + k);
    return make_float4(0.f, 0.f, 0.f, 0.f);
}

// Unit u of weight row r dequantized into v, zeros past the last row or unit (a partial tile).
template <typename F>
__device__ __forceinline__ void load_w_unit(const uint8_t* __restrict__ w, size_t row_bytes, int rows, int n_units, int r,
                                            int u, float* v) {
    if (r < rows && u < n_units) {
        F::load(w + static_cast<size_t>(r) * row_bytes, u, v);
    } else {
#pragma unroll
        for (int j = 0; j < F::VPT; ++j) v[j] = 0.f;
    }
}

// grid (ceil(rows / kMvWarps), ceil(T / kMvTokens)), block kMvWarps * 32.
template <typename F>
__global__ void __launch_bounds__(kMvWarps * 32)
matvec_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int rows, int n_units,
              const float* __restrict__ x, int64_t n, float* __restrict__ y, int n_tokens) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * kMvWarps + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warp leaves together
    const int t0 = blockIdx.y * kMvTokens;
    const int nt = min(kMvTokens, n_tokens - t0);
    const uint8_t* wr = w + static_cast<size_t>(row) * row_bytes;
    const float* x0 = x + static_cast<size_t>(t0) * n;

    float acc[kMvTokens];
#pragma unroll
    for (int t = 0; t < kMvTokens; ++t) acc[t] = 0.f;

    for (int u = lane; u < n_units; u += 32) {
        float v[F::VPT];
        F::load(wr, u, v);
        const int p0 = F::pos0(u);
#pragma unroll
        for (int t = 0; t < kMvTokens; ++t)
            if (t < nt) acc[t] += dot_unit<F>(v, x0 + static_cast<size_t>(t) * n + p0);
    }
#pragma unroll
    for (int t = 0; t < kMvTokens; ++t) {
        const float s = warp_sum(acc[t]);
        if (lane == 0 && t < nt) y[static_cast<size_t>(t0 + t) * rows + row] = s;
    }
}

// grid (ceil(rows / kTileN), ceil(T / kTileM)), block kTileThreads. Thread (tx, ty) of the 16x16
// grid owns tokens ty + 16i and rows tx + 16j (i, j < 4): strided so that a warp's shared-memory
// reads are broadcasts or consecutive words.
template <typename F>
__global__ void __launch_bounds__(kTileThreads)
matmul_tiled_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int rows, int n_units,
                    const float* __restrict__ x, int64_t n, float* __restrict__ y, int n_tokens) {
    constexpr int kUnitsPerStep = kTileK / F::VPT;
    __shared__ float xs[kTileK][kTileM + 4];  // [k][token]; padding staggers banks on the stores
    __shared__ float ws[kTileK][kTileN + 4];  // [k][row]
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int tok0 = blockIdx.y * kTileM, row0 = blockIdx.x * kTileN;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (int64_t k0 = 0; k0 < n; k0 += kTileK) {
        // x tile: each thread loads float4s along k (coalesced along the token's row).
        for (int i = tid; i < kTileM * (kTileK / 4); i += kTileThreads) {
            const int tk = i / (kTileK / 4), q4 = i % (kTileK / 4);
            const float4 a = load_x4(x, n, n_tokens, tok0 + tk, k0 + 4 * q4);
            xs[4 * q4 + 0][tk] = a.x;
            xs[4 * q4 + 1][tk] = a.y;
            xs[4 * q4 + 2][tk] = a.z;
            xs[4 * q4 + 3][tk] = a.w;
        }
        // Weight tile: units [k0/VPT, k0/VPT + kUnitsPerStep) of each row, zero past the row's end.
        const int u0 = static_cast<int>(k0 / F::VPT);
        for (int i = tid; i < kTileN * kUnitsPerStep; i += kTileThreads) {
            const int r = i / kUnitsPerStep, u = u0 + i % kUnitsPerStep;
            float v[F::VPT];
            load_w_unit<F>(w, row_bytes, rows, n_units, row0 + r, u, v);
            const int kk = F::pos0(u) - static_cast<int>(k0);
#pragma unroll
            for (int g = 0; g < F::NG; ++g)
#pragma unroll
                for (int c = 0; c < F::G; ++c) ws[kk + g * F::GAP + c][r] = v[g * F::G + c];
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kTileK; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                a[i] = xs[kk][ty + 16 * i];
                b[i] = ws[kk][tx + 16 * i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int t = tok0 + ty + 16 * i;
        if (t >= n_tokens) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = row0 + tx + 16 * j;
            if (r < rows) y[static_cast<size_t>(t) * rows + r] = acc[i][j];
        }
    }
}

// grid (ceil(rows / kTileN), ceil(T / kTileM)), block kTcThreads. The same tiles as matmul_tiled_kernel,
// held in shared memory as f16 ([token][k] and [row][k], so the weight tile is WMMA's column-major B);
// warp (wm, wn) accumulates tokens 32 wm.. x rows 32 wn.. in four f32 fragments. The epilogue stages the
// 64 x 64 result through shared memory (aliasing the tiles) for bounds-checked, coalesced stores.
template <typename F>
__global__ void __launch_bounds__(kTcThreads)
matmul_tc_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int rows, int n_units, const float* __restrict__ x,
                 int64_t n, float* __restrict__ y, int n_tokens) {
    using namespace nvcuda;
    constexpr int kUnitsPerStep = kTileK / F::VPT;
    constexpr int kTileBytes = (kTileM + kTileN) * kTcLd * 2;
    constexpr int kOutBytes = kTileM * kTcOutLd * 4;
    __shared__ __align__(32) unsigned char smem[kTileBytes > kOutBytes ? kTileBytes : kOutBytes];
    __half* xs = reinterpret_cast<__half*>(smem);  // [kTileM][kTcLd]: token, k
    __half* ws = xs + kTileM * kTcLd;              // [kTileN][kTcLd]: weight row, k
    const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
    const int tok0 = blockIdx.y * kTileM, row0 = blockIdx.x * kTileN;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    for (int64_t k0 = 0; k0 < n; k0 += kTileK) {
        for (int i = tid; i < kTileM * (kTileK / 4); i += kTcThreads) {
            const int tk = i / (kTileK / 4), q4 = i % (kTileK / 4);
            const float4 a = load_x4(x, n, n_tokens, tok0 + tk, k0 + 4 * q4);
            __half* d = xs + tk * kTcLd + 4 * q4;
            d[0] = to_half_sat(a.x);
            d[1] = to_half_sat(a.y);
            d[2] = to_half_sat(a.z);
            d[3] = to_half_sat(a.w);
        }
        const int u0 = static_cast<int>(k0 / F::VPT);
        for (int i = tid; i < kTileN * kUnitsPerStep; i += kTcThreads) {
            const int r = i / kUnitsPerStep, u = u0 + i % kUnitsPerStep;
            float v[F::VPT];
            load_w_unit<F>(w, row_bytes, rows, n_units, row0 + r, u, v);
            __half* d = ws + r * kTcLd + (F::pos0(u) - static_cast<int>(k0));
#pragma unroll
            for (int g = 0; g < F::NG; ++g)
#pragma unroll
                for (int c = 0; c < F::G; ++c) d[g * F::GAP + c] = to_half_sat(v[g * F::G + c]);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], xs + (wm * 32 + 16 * i) * kTcLd + kk, kTcLd);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ws + (wn * 32 + 16 * j) * kTcLd + kk, kTcLd);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();  // the tiles are read before the next step (or the epilogue) overwrites them
    }
    float* out = reinterpret_cast<float*>(smem);  // [kTileM][kTcOutLd]
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(out + (wm * 32 + 16 * i) * kTcOutLd + wn * 32 + 16 * j, acc[i][j], kTcOutLd,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int i = tid; i < kTileM * kTileN; i += kTcThreads) {
        const int t = tok0 + i / kTileN, r = row0 + i % kTileN;
        if (t < n_tokens && r < rows) y[static_cast<size_t>(t) * rows + r] = out[(i / kTileN) * kTcOutLd + i % kTileN];
    }
}

// grid n_ids, block 128: one block per gathered row.
template <typename F>
__global__ void get_rows_kernel(const uint8_t* __restrict__ table, size_t row_bytes, int64_t n_table_rows,
                                int n_units, const int32_t* __restrict__ ids, float* __restrict__ dst, int64_t n) {
    const int64_t id = ids[blockIdx.x];
    float* out = dst + static_cast<size_t>(blockIdx.x) * n;
    const bool valid = id >= 0 && id < n_table_rows;
    const uint8_t* src = table + static_cast<size_t>(valid ? id : 0) * row_bytes;
    for (int u = threadIdx.x; u < n_units; u += blockDim.x) {
        float v[F::VPT];
        if (valid) {
            F::load(src, u, v);
        } else {
#pragma unroll
            for (int j = 0; j < F::VPT; ++j) v[j] = 0.f;
        }
        const int p0 = F::pos0(u);
#pragma unroll
        for (int g = 0; g < F::NG; ++g)
#pragma unroll
            for (int c = 0; c < F::G; ++c) out[p0 + g * F::GAP + c] = v[g * F::G + c];
    }
}

// Shape checks shared by matmul and get_rows; returns the row size in bytes.
template <typename F>
size_t checked_row_bytes(const char* fn, const void* w, int64_t n) {
    if (n <= 0 || n % F::QK != 0) throw_arg(fn, "n must be a positive multiple of the format's block size");
    if (n / F::VPT > 0x7FFFFFFF) throw_arg(fn, "n too large");
    if (!aligned(w, F::ALIGN)) throw_arg(fn, "weight/table pointer is not aligned for its format");
    return static_cast<size_t>(n / F::QK) * F::BYTES;
}

}  // namespace
}  // namespace cudak

using namespace cudak;

bool cuda_matmul_supported(DType t) {
    return dispatch_format(static_cast<int>(t), [](auto) {});
}

size_t cuda_row_bytes(DType t, int64_t n) {
    size_t out = 0;
    dispatch_format(static_cast<int>(t), [&](auto fmt) {
        using F = decltype(fmt);
        if (n >= 0 && n % F::QK == 0) out = static_cast<size_t>(n / F::QK) * F::BYTES;
    });
    return out;
}

void cuda_matmul(DType w_type, const void* w, int64_t rows, int64_t n, const float* x, int64_t n_tokens, float* y,
                 void* stream, MatmulKernel kernel) {
    const char* fn = "cuda_matmul";
    if (rows < 0 || rows > 0x7FFFFFFF || n_tokens < 0 || n_tokens > 0x7FFFFFFF) throw_arg(fn, "bad shape");
    if (!aligned(x, 16)) throw_arg(fn, "x must be 16-byte aligned");
    if (rows == 0 || n_tokens == 0) return;
    const cudaStream_t s = as_stream(stream);
    const bool ok = dispatch_format(static_cast<int>(w_type), [&](auto fmt) {
        using F = decltype(fmt);
        const size_t rb = checked_row_bytes<F>(fn, w, n);
        const int n_units = static_cast<int>(n / F::VPT);
        const auto* wp = static_cast<const uint8_t*>(w);
        const bool tc = kernel == MatmulKernel::TensorCore || (kernel == MatmulKernel::Auto && n_tokens >= kTcMinT);
        if (kernel == MatmulKernel::Auto && n_tokens <= kMvMaxT) {
            const dim3 grid(grid_for(rows, kMvWarps), grid_for(n_tokens, kMvTokens));
            matvec_kernel<F><<<grid, kMvWarps * 32, 0, s>>>(wp, rb, static_cast<int>(rows), n_units, x, n, y,
                                                            static_cast<int>(n_tokens));
            check_launch("matvec_kernel");
        } else {
            if (grid_for(n_tokens, kTileM) > 65535) throw_arg(fn, "too many tokens for one launch");
            const dim3 grid(grid_for(rows, kTileN), grid_for(n_tokens, kTileM));
            if (tc) {
                matmul_tc_kernel<F><<<grid, kTcThreads, 0, s>>>(wp, rb, static_cast<int>(rows), n_units, x, n, y,
                                                                static_cast<int>(n_tokens));
                check_launch("matmul_tc_kernel");
            } else {
                matmul_tiled_kernel<F><<<grid, kTileThreads, 0, s>>>(wp, rb, static_cast<int>(rows), n_units, x, n, y,
                                                                     static_cast<int>(n_tokens));
                check_launch("matmul_tiled_kernel");
            }
        }
    });
    if (!ok) throw_arg(fn, "unsupported weight type");
}

void cuda_get_rows(DType type, const void* table, int64_t n_table_rows, int64_t n, const int32_t* ids, int64_t n_ids,
                   float* dst, void* stream) {
    const char* fn = "cuda_get_rows";
    if (n_ids < 0 || n_ids > 0x7FFFFFFF) throw_arg(fn, "bad n_ids");
    if (n_ids == 0) return;
    const bool ok = dispatch_format(static_cast<int>(type), [&](auto fmt) {
        using F = decltype(fmt);
        const size_t rb = checked_row_bytes<F>(fn, table, n);
        get_rows_kernel<F><<<static_cast<unsigned>(n_ids), 128, 0, as_stream(stream)>>>(
            static_cast<const uint8_t*>(table), rb, n_table_rows, static_cast<int>(n / F::VPT), ids, dst, n);
        check_launch("get_rows_kernel");
    });
    if (!ok) throw_arg(fn, "unsupported type");
}

}  // namespace x2l
