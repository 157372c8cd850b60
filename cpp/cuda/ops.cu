// Norms, RoPE, softmax and elementwise kernels (f32 activations).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "core/common.h"
#include "cuda/common.cuh"
#include "cuda/backend.h"

namespace x2l {
namespace cudak {
namespace {

constexpr int kRowThreads = 256;  // one block per row for the row-wise reductions
constexpr int kEwThreads = 256;

// Block-wide sum/max for kRowThreads threads; every thread gets the result. `red` holds 32 floats.
__device__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // `red` may still be read from a previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : 0.f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : -INFINITY;
    return warp_max(v);
}

// grid n_rows
__global__ void __launch_bounds__(kRowThreads)
rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int64_t n, float eps) {
    __shared__ float red[32];
    const float* xr = x + static_cast<size_t>(blockIdx.x) * n;
    float* yr = y + static_cast<size_t>(blockIdx.x) * n;
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    const float sc = rsqrtf(ss / static_cast<float>(n) + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * sc * (w ? w[i] : 1.f);
}

// grid n_rows. Two passes (mean, then squared deviations) for accuracy on rows with a large mean.
__global__ void __launch_bounds__(kRowThreads)
layer_norm_kernel(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                  float* __restrict__ y, int64_t n, float eps) {
    __shared__ float red[32];
    const float* xr = x + static_cast<size_t>(blockIdx.x) * n;
    float* yr = y + static_cast<size_t>(blockIdx.x) * n;
    float s = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, red) / static_cast<float>(n);
    float v = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = xr[i] - mean;
        v += d * d;
    }
    const float inv = rsqrtf(block_sum(v, red) / static_cast<float>(n) + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = (xr[i] - mean) * inv * (w ? w[i] : 1.f) + (b ? b[i] : 0.f);
}

// grid n_rows
__global__ void __launch_bounds__(kRowThreads)
softmax_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n, float scale) {
    __shared__ float red[32];
    const float* xr = x + static_cast<size_t>(blockIdx.x) * n;
    float* yr = y + static_cast<size_t>(blockIdx.x) * n;
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, xr[i] * scale);
    mx = block_max(mx, red);
    float s = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += expf(xr[i] * scale - mx);
    const float inv = 1.f / block_sum(s, red);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = expf(xr[i] * scale - mx) * inv;
}

// One thread per (token, rotated pair); the angle is computed once and applied to every head (FP32:
// rope_sincos in common.cuh says how it stays accurate at long contexts).
// x and y may be the same buffer (in-place rotation), so neither is __restrict__.
__global__ void rope_kernel(const float* x, float* y, const int32_t* __restrict__ pos,
                            int64_t n_tokens, int n_head, int head_dim, int64_t tok_stride, int n_rot,
                            RopeSteps steps, int neox) {
    const int half = n_rot / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= n_tokens * half) return;
    const int64_t t = idx / half;
    const int i = static_cast<int>(idx - t * half);
    float s, c;
    rope_sincos(pos[t], steps.hi[i], steps.lo[i], &s, &c);
    const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
    for (int h = 0; h < n_head; ++h) {
        const int64_t base = t * tok_stride + static_cast<int64_t>(h) * head_dim;
        const float x0 = x[base + i0], x1 = x[base + i1];
        y[base + i0] = x0 * c - x1 * s;
        y[base + i1] = x0 * s + x1 * c;
    }
}

// Copies the unrotated tail dims [n_rot, head_dim) when rope writes out of place.
__global__ void rope_tail_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n_tokens, int n_head,
                                 int head_dim, int64_t tok_stride, int n_rot) {
    const int tail = head_dim - n_rot;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= n_tokens * n_head * tail) return;
    const int64_t th = idx / tail;
    const int d = n_rot + static_cast<int>(idx - th * tail);
    const int64_t t = th / n_head;
    const int h = static_cast<int>(th - t * n_head);
    const int64_t off = t * tok_stride + static_cast<int64_t>(h) * head_dim + d;
    y[off] = x[off];
}

__global__ void swiglu_kernel(const float* g, const float* __restrict__ u, float* y, int64_t n) {  // y may be g
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const float a = g[i];
        y[i] = a / (1.f + expf(-a)) * u[i];
    }
}

// mode 0: gelu (erf), 1: gelu (tanh approximation), 2: quick_gelu x * sigmoid(1.702 x) (CLIP)
// The tanh form is evaluated as v * sigmoid(2u) (0.5 (1 + tanh u) == 1 / (1 + e^-2u)): no tanhf, whose
// approximate instruction (tanh.approx.f32, ~2^-11) would be off by ~7e-4 near v = -3, and no
// cancellation in 1 + tanh u for large negative v. e^-2u overflowing to inf gives v / inf = -0.
// x and y may be the same buffer (in place), so neither is __restrict__.
__global__ void gelu_kernel(const float* x, float* y, int64_t n, int mode) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const float v = x[i];
        if (mode == 1) {
            const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
            y[i] = v / (1.f + expf(-2.f * u));
        } else if (mode == 2) {
            y[i] = v / (1.f + expf(-1.702f * v));
        } else {
            y[i] = 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
        }
    }
}

// One thread per (frame, output cell, channel): x [n, g, g, C] -> y [n, pg, pg, C].
// avg: the mean of each stride x stride block (avg_pool2d, kernel = stride, no padding).
// bilinear: torch's upsample_bilinear2d with align_corners=False and an output size (not a scale):
// src = max((dst + 0.5) * g / pg - 0.5, 0), right tap clamped at the edge, taps summed as
// h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d) - the CPU encoder's order.
struct Tap {
    int i0, i1;
    float l0, l1;
};
__device__ Tap bilinear_tap(int o, int g, int pg) {
    const float scale = static_cast<float>(g) / static_cast<float>(pg);
    const float src = fmaxf(__fsub_rn(__fmul_rn(scale, static_cast<float>(o) + 0.5f), 0.5f), 0.f);
    Tap t;
    t.i0 = static_cast<int>(src);
    t.i1 = t.i0 + (t.i0 < g - 1 ? 1 : 0);
    t.l1 = fminf(fmaxf(src - static_cast<float>(t.i0), 0.f), 1.f);
    t.l0 = 1.f - t.l1;
    return t;
}

__global__ void pool2d_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n, int g, int pg, int C,
                              int stride, int bilinear) {
    const int64_t total = n * pg * pg * C;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int c = static_cast<int>(i % C);
        const int64_t cell = i / C;
        const int ox = static_cast<int>(cell % pg), oy = static_cast<int>((cell / pg) % pg);
        const int64_t b = cell / (static_cast<int64_t>(pg) * pg);
        const float* f = x + b * g * g * C + c;  // this frame's channel c; cell (r, q) at (r * g + q) * C
        if (bilinear) {
            const Tap ty = bilinear_tap(oy, g, pg), tx = bilinear_tap(ox, g, pg);
            const float* r0 = f + static_cast<int64_t>(ty.i0) * g * C;
            const float* r1 = f + static_cast<int64_t>(ty.i1) * g * C;
            const int64_t c0 = static_cast<int64_t>(tx.i0) * C, c1 = static_cast<int64_t>(tx.i1) * C;
            y[i] = ty.l0 * (tx.l0 * r0[c0] + tx.l1 * r0[c1]) + ty.l1 * (tx.l0 * r1[c0] + tx.l1 * r1[c1]);
        } else {
            float s = 0.f;
            for (int ky = 0; ky < stride; ++ky)
                for (int kx = 0; kx < stride; ++kx)
                    s += f[(static_cast<int64_t>(oy * stride + ky) * g + ox * stride + kx) * C];
            y[i] = s / static_cast<float>(stride * stride);
        }
    }
}

// Pixel shuffle (Idefics3's connector): one thread per output value. Output token (i, j) of a frame holds
// the s x s input tokens (i*s + dy, j*s + dx), dy-major, their channels side by side.
__global__ void pixel_shuffle_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n, int side, int s,
                                     int64_t C) {
    const int g = side / s;
    const int64_t total = n * side * side * C;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t c = i % C;
        int64_t r = i / C;  // output sub-row: ((frame * g + oi) * g + oj) * s * s + dy * s + dx
        const int dx = static_cast<int>(r % s);
        r /= s;
        const int dy = static_cast<int>(r % s);
        r /= s;
        const int oj = static_cast<int>(r % g);
        r /= g;
        const int oi = static_cast<int>(r % g);
        const int64_t b = r / g;
        const int64_t src = (b * side + oi * s + dy) * side + oj * s + dx;  // the frame's input token
        y[i] = x[src * C + c];
    }
}

// Rotary embedding over position axes (M-RoPE, the ViT's 2-D rotary): one thread per (token, pair), NEOX
// pairs (i, i + head_dim/2), angle pos[axis[i]][t] * freq[i] with the accurate FP32 reduction of rope_sincos.
// x and y may be the same buffer.
__global__ void rope_axes_kernel(const float* x, float* y, const int32_t* __restrict__ pos, int64_t pos_axis_stride,
                                 int64_t n_tokens, int n_head, int head_dim, int64_t tok_stride, RopeAxesTable table) {
    const int half = head_dim / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= n_tokens * half) return;
    const int64_t t = idx / half;
    const int i = static_cast<int>(idx - t * half);
    float s, c;
    rope_sincos(pos[table.axis[i] * pos_axis_stride + t], table.freq[i], 0.f, &s, &c);
    for (int h = 0; h < n_head; ++h) {
        const int64_t base = t * tok_stride + static_cast<int64_t>(h) * head_dim;
        const float x0 = x[base + i], x1 = x[base + i + half];
        y[base + i] = x0 * c - x1 * s;
        y[base + i + half] = x0 * s + x1 * c;
    }
}

// row (device, nullable): y is advanced by *row * row_elems halves, read when the kernel runs.
__global__ void f32_to_f16_kernel(const float* __restrict__ x, __half* __restrict__ y, int64_t n,
                                  const int32_t* __restrict__ row, int64_t row_elems) {
    if (row) y += static_cast<int64_t>(*row) * row_elems;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
        y[i] = __float2half_rn(x[i]);
}

// dst[ids[i], :] = src[i, :]; ids outside [0, n_dst) are skipped.
__global__ void set_rows_kernel(const float* __restrict__ src, const int32_t* __restrict__ ids, int64_t n_ids, int64_t n,
                                float* __restrict__ dst, int64_t n_dst) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_ids * n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = i / n;
        const int32_t id = ids[r];
        if (id >= 0 && id < n_dst) dst[id * n + (i - r * n)] = src[i];
    }
}

// dst[i, :] = src[ids[i], :], rows of `words` 32-bit words copied as they are; ids outside [0, n_src) give zeros.
__global__ void gather_rows_kernel(const uint32_t* __restrict__ src, int64_t n_src, int64_t words,
                                   const int32_t* __restrict__ ids, int64_t n_ids, uint32_t* __restrict__ dst) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_ids * words;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = i / words;
        const int32_t id = ids[r];
        dst[i] = id >= 0 && id < n_src ? src[id * words + (i - r * words)] : 0u;
    }
}

// op 0: add, 1: mul
__global__ void binary_kernel(const float* a, const float* b, float* y, int64_t n, int64_t b_period, int op) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const float bv = b[b_period == n ? i : i % b_period];
        y[i] = op == 0 ? a[i] + bv : a[i] * bv;
    }
}

// Grid-stride launches: enough blocks to fill any target GPU, capped so huge n loops instead.
unsigned ew_grid(int64_t n) {
    const int64_t blocks = (n + kEwThreads - 1) / kEwThreads;
    return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

void check_rows(const char* fn, int64_t n_rows, int64_t n) {
    if (n_rows < 0 || n_rows > 0x7FFFFFFF || n <= 0) throw_arg(fn, "bad shape");
}

}  // namespace
}  // namespace cudak

using namespace cudak;

void cuda_rms_norm(const float* x, const float* w, float* y, int64_t n_rows, int64_t n, float eps, void* stream) {
    check_rows("cuda_rms_norm", n_rows, n);
    if (n_rows == 0) return;
    rms_norm_kernel<<<static_cast<unsigned>(n_rows), kRowThreads, 0, as_stream(stream)>>>(x, w, y, n, eps);
    check_launch("rms_norm_kernel");
}

void cuda_layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n_rows, int64_t n, float eps,
                     void* stream) {
    check_rows("cuda_layer_norm", n_rows, n);
    if (n_rows == 0) return;
    layer_norm_kernel<<<static_cast<unsigned>(n_rows), kRowThreads, 0, as_stream(stream)>>>(x, w, b, y, n, eps);
    check_launch("layer_norm_kernel");
}

void cuda_softmax(const float* x, float* y, int64_t n_rows, int64_t n, float scale, void* stream) {
    check_rows("cuda_softmax", n_rows, n);
    if (n_rows == 0) return;
    softmax_kernel<<<static_cast<unsigned>(n_rows), kRowThreads, 0, as_stream(stream)>>>(x, y, n, scale);
    check_launch("softmax_kernel");
}

void cuda_rope(const float* x, float* y, const int32_t* pos, int64_t n_tokens, int64_t n_head, int64_t head_dim,
               int64_t tok_stride, int n_rot, float freq_base, float freq_scale, RopeMode mode, void* stream) {
    const char* fn = "cuda_rope";
    if (n_tokens < 0 || n_head <= 0 || head_dim <= 0 || n_head > 0x7FFFFFFF || head_dim > 0x7FFFFFFF)
        throw_arg(fn, "bad shape");
    if (n_rot <= 0 || n_rot % 2 != 0 || n_rot > head_dim) throw_arg(fn, "n_rot must be even and in 2..head_dim");
    if (n_rot > 2 * kMaxRopePairs) throw_arg(fn, "n_rot must be <= 256");
    if (tok_stride < n_head * head_dim) throw_arg(fn, "tok_stride smaller than n_head * head_dim");
    if (!(freq_base > 0.f)) throw_arg(fn, "freq_base must be > 0");
    if (mode != RopeMode::Norm && mode != RopeMode::Neox) throw_arg(fn, "mode must be Norm (0) or Neox (2)");
    if (n_tokens == 0) return;
    const cudaStream_t s = as_stream(stream);
    const int64_t pairs = n_tokens * (n_rot / 2);
    rope_kernel<<<grid_for(pairs, 128), 128, 0, s>>>(x, y, pos, n_tokens, static_cast<int>(n_head),
                                                     static_cast<int>(head_dim), tok_stride, n_rot,
                                                     rope_steps(n_rot, freq_base, freq_scale), mode == RopeMode::Neox);
    check_launch("rope_kernel");
    if (x != y && n_rot < head_dim) {
        const int64_t tail = n_tokens * n_head * (head_dim - n_rot);
        rope_tail_kernel<<<grid_for(tail, 256), 256, 0, s>>>(x, y, n_tokens, static_cast<int>(n_head),
                                                            static_cast<int>(head_dim), tok_stride, n_rot);
        check_launch("rope_tail_kernel");
    }
}

void cuda_rope_axes(const float* x, float* y, const int32_t* pos, int64_t pos_axis_stride, int64_t n_tokens,
                    int64_t n_head, int64_t head_dim, int64_t tok_stride, const float* freq, const uint8_t* axis,
                    int n_axes, void* stream) {
    const char* fn = "cuda_rope_axes";
    if (n_tokens < 0 || n_head <= 0 || head_dim <= 0 || n_head > 0x7FFFFFFF) throw_arg(fn, "bad shape");
    if (head_dim % 2 != 0 || head_dim > 2 * kMaxRopePairs) throw_arg(fn, "head_dim must be even and <= 256");
    if (tok_stride < n_head * head_dim) throw_arg(fn, "tok_stride smaller than n_head * head_dim");
    if (n_axes < 1 || n_axes > 4 || pos_axis_stride < 0) throw_arg(fn, "n_axes must be 1..4, pos_axis_stride >= 0");
    if (!freq || !axis) throw_arg(fn, "need the pairs' frequencies and axes");
    RopeAxesTable table{};
    for (int i = 0; i < head_dim / 2; ++i) {
        if (axis[i] >= n_axes || !(std::isfinite(freq[i]))) throw_arg(fn, "a pair's axis or frequency is out of range");
        table.freq[i] = freq[i];
        table.axis[i] = axis[i];
    }
    if (n_tokens == 0) return;
    const int64_t pairs = n_tokens * (head_dim / 2);
    rope_axes_kernel<<<grid_for(pairs, 128), 128, 0, as_stream(stream)>>>(
        x, y, pos, pos_axis_stride, n_tokens, static_cast<int>(n_head), static_cast<int>(head_dim), tok_stride, table);
    check_launch("rope_axes_kernel");
}

void cuda_pixel_shuffle(const float* x, float* y, int64_t n_frames, int side, int scale, int64_t channels, void* stream) {
    const char* fn = "cuda_pixel_shuffle";
    if (n_frames < 0 || channels <= 0 || scale < 1 || side < scale || side % scale != 0)
        throw_arg(fn, "the grid side must be a positive multiple of scale");
    const int64_t total = n_frames * side * side * channels;
    if (total == 0) return;
    pixel_shuffle_kernel<<<ew_grid(total), kEwThreads, 0, as_stream(stream)>>>(x, y, n_frames, side, scale, channels);
    check_launch("pixel_shuffle_kernel");
}

void cuda_swiglu(const float* gate, const float* up, float* y, int64_t n, void* stream) {
    if (n < 0) throw_arg("cuda_swiglu", "bad n");
    if (n == 0) return;
    swiglu_kernel<<<ew_grid(n), kEwThreads, 0, as_stream(stream)>>>(gate, up, y, n);
    check_launch("swiglu_kernel");
}

void cuda_gelu(const float* x, float* y, int64_t n, GeluMode mode, void* stream) {
    if (n < 0) throw_arg("cuda_gelu", "bad n");
    if (mode != GeluMode::Erf && mode != GeluMode::Tanh && mode != GeluMode::Quick) throw_arg("cuda_gelu", "bad mode");
    if (n == 0) return;
    gelu_kernel<<<ew_grid(n), kEwThreads, 0, as_stream(stream)>>>(x, y, n, static_cast<int>(mode));
    check_launch("gelu_kernel");
}

void cuda_pool2d(const float* x, float* y, int64_t n_frames, int grid, int out_grid, int64_t channels, PoolKind kind,
                 int stride, void* stream) {
    const char* fn = "cuda_pool2d";
    if (n_frames < 0 || grid <= 0 || out_grid <= 0 || channels <= 0 || channels > 0x7FFFFFFF) throw_arg(fn, "bad shape");
    if (kind == PoolKind::Avg) {
        if (stride <= 0 || out_grid * stride > grid) throw_arg(fn, "out_grid * stride must be <= grid");
    } else if (kind != PoolKind::Bilinear) {
        throw_arg(fn, "bad kind");
    }
    const int64_t total = n_frames * out_grid * out_grid * channels;
    if (total == 0) return;
    pool2d_kernel<<<ew_grid(total), kEwThreads, 0, as_stream(stream)>>>(
        x, y, n_frames, grid, out_grid, static_cast<int>(channels), stride, kind == PoolKind::Bilinear ? 1 : 0);
    check_launch("pool2d_kernel");
}

void cuda_f32_to_f16(const float* x, void* y, int64_t n, void* stream) {
    if (n < 0) throw_arg("cuda_f32_to_f16", "bad n");
    if (n == 0) return;
    f32_to_f16_kernel<<<ew_grid(n), kEwThreads, 0, as_stream(stream)>>>(x, static_cast<__half*>(y), n, nullptr, 0);
    check_launch("f32_to_f16_kernel");
}

void cuda_f32_to_f16_at(const float* x, void* y, int64_t n, const int32_t* row, int64_t row_elems, void* stream) {
    if (n < 0 || !row || row_elems < n) throw_arg("cuda_f32_to_f16_at", "need a row pointer and n <= row_elems");
    if (n == 0) return;
    f32_to_f16_kernel<<<ew_grid(n), kEwThreads, 0, as_stream(stream)>>>(x, static_cast<__half*>(y), n, row, row_elems);
    check_launch("f32_to_f16_kernel");
}

void cuda_set_rows(const float* src, const int32_t* ids, int64_t n_ids, int64_t n, float* dst, int64_t n_dst_rows,
                   void* stream) {
    if (n_ids < 0 || n <= 0 || n_dst_rows < 0) throw_arg("cuda_set_rows", "bad shape");
    if (n_ids == 0) return;
    set_rows_kernel<<<ew_grid(n_ids * n), kEwThreads, 0, as_stream(stream)>>>(src, ids, n_ids, n, dst, n_dst_rows);
    check_launch("set_rows_kernel");
}

void cuda_gather_rows(const void* src, int64_t n_src_rows, size_t row_bytes, const int32_t* ids, int64_t n_ids, void* dst,
                      void* stream) {
    if (n_src_rows < 0 || n_ids < 0 || row_bytes == 0 || row_bytes % 4 != 0 || !aligned(src, 4) || !aligned(dst, 4))
        throw_arg("cuda_gather_rows", "rows must be a multiple of 4 bytes, 4-byte aligned");
    if (n_ids == 0) return;
    const int64_t words = static_cast<int64_t>(row_bytes / 4);
    gather_rows_kernel<<<ew_grid(n_ids * words), kEwThreads, 0, as_stream(stream)>>>(
        static_cast<const uint32_t*>(src), n_src_rows, words, ids, n_ids, static_cast<uint32_t*>(dst));
    check_launch("gather_rows_kernel");
}

static void binary(const char* fn, const float* a, const float* b, float* y, int64_t n, int64_t b_period, int op,
                   void* stream) {
    if (n < 0 || b_period <= 0 || n % b_period != 0) throw_arg(fn, "n must be a multiple of b_period > 0");
    if (n == 0) return;
    binary_kernel<<<ew_grid(n), kEwThreads, 0, as_stream(stream)>>>(a, b, y, n, b_period, op);
    check_launch("binary_kernel");
}

void cuda_add(const float* a, const float* b, float* y, int64_t n, int64_t b_period, void* stream) {
    binary("cuda_add", a, b, y, n, b_period, 0, stream);
}

void cuda_mul(const float* a, const float* b, float* y, int64_t n, int64_t b_period, void* stream) {
    binary("cuda_mul", a, b, y, n, b_period, 1, stream);
}

}  // namespace x2l
