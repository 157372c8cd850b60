// Re-rotation of cached keys to new positions (X²L with dense positions, the beacon compressor): a
// chunk's keys sit at consecutive positions after everything before it in the mixed cache, so when a
// chunk before it is decoded from its L-KVs instead of its H-KVs (or back) its keys move. RoPE composes,
// rope(k at p, delta) = k at p + delta, so the cached (post-RoPE) rows are rotated by delta in place of
// a new forward. Quantized rows are dequantized, rotated in f32 and quantized again with the CPU's rules
// (quant.cpp), which is what the CPU Reloader does on its copy.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "core/common.h"
#include "cuda/common.cuh"
#include "cuda/formats.cuh"
#include "cuda/backend.h"

namespace x2l {
namespace cudak {
namespace {

constexpr int kMaxHeadDim = 256;

__device__ float key_value(int type, const uint8_t* row, int j) {
    switch (type) {
        case kF32:
            return reinterpret_cast<const float*>(row)[j];
        case kF16:
            return half_bits_to_float(ld_u16(row + 2 * j));
        case kQ8_0: {
            const uint8_t* b = row + (j / 32) * 34;  // {f16 d; int8 qs[32]}
            return half_bits_to_float(ld_u16(b)) * static_cast<float>(static_cast<int8_t>(b[2 + j % 32]));
        }
        default: {  // kQ4_0 {f16 d; uint8 qs[16]}: byte i holds value i (low nibble) and i + 16 (high)
            const uint8_t* b = row + (j / 32) * 18;
            const int i = j % 32;
            const int q = i < 16 ? (b[2 + i] & 15) : (b[2 + i - 16] >> 4);
            return static_cast<float>(q - 8) * half_bits_to_float(ld_u16(b));
        }
    }
}

// One warp per row: the row goes to shared memory, every rotated pair is rotated by one lane, then the
// row is written back in its type (32-value blocks: one value per lane, warp reductions for the scale).
// grid n_rows
__global__ void __launch_bounds__(32)
    rerotate_kernel(const uint8_t* src, uint8_t* dst, size_t row_stride, int type, int head_dim, int n_rot, int neox,
                    RopeSteps steps, int32_t delta) {
    __shared__ float v[kMaxHeadDim];
    const int lane = threadIdx.x;
    const uint8_t* in = src + static_cast<size_t>(blockIdx.x) * row_stride;
    uint8_t* out = dst + static_cast<size_t>(blockIdx.x) * row_stride;
    for (int j = lane; j < head_dim; j += 32) v[j] = key_value(type, in, j);
    __syncthreads();
    const int half = n_rot / 2;
    for (int i = lane; i < half; i += 32) {
        float s, c;
        rope_sincos(delta, steps.hi[i], steps.lo[i], &s, &c);
        const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
        const float x0 = v[i0], x1 = v[i1];
        v[i0] = x0 * c - x1 * s;
        v[i1] = x0 * s + x1 * c;
    }
    __syncthreads();  // every load of `in` is done: out may be in
    if (type == kF32) {
        for (int j = lane; j < head_dim; j += 32) reinterpret_cast<float*>(out)[j] = v[j];
    } else if (type == kF16) {
        for (int j = lane; j < head_dim; j += 32) reinterpret_cast<__half*>(out)[j] = __float2half_rn(v[j]);
    } else if (type == kQ8_0) {
        // d = amax / 127, q = round(x / d) (half away from zero): quant_block_q8. Correctly rounded
        // division and reciprocal, as the CPU's (whatever the build's flags).
        for (int b = 0; b < head_dim / 32; ++b) {
            const float x = v[32 * b + lane];
            const float amax = warp_max(fabsf(x));
            const float d = __fdiv_rn(amax, 127.f);
            const float id = d != 0.f ? __frcp_rn(d) : 0.f;
            uint8_t* blk = out + 34 * b;
            blk[2 + lane] = static_cast<uint8_t>(static_cast<int8_t>(roundf(__fmul_rn(x, id))));
            if (lane == 0) *reinterpret_cast<__half*>(blk) = __float2half_rn(d);
        }
    } else {
        // Q4_0: d = (the value of largest magnitude, the first one on ties) / -8, q = min(15, trunc(x/d + 8.5)).
        for (int b = 0; b < head_dim / 32; ++b) {
            const float x = v[32 * b + lane];
            float a = fabsf(x);
            int at = lane;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float a2 = __shfl_xor_sync(0xffffffffu, a, o);
                const int at2 = __shfl_xor_sync(0xffffffffu, at, o);
                if (a2 > a || (a2 == a && at2 < at)) {
                    a = a2;
                    at = at2;
                }
            }
            const float d = __fdiv_rn(v[32 * b + at], -8.f);
            const float id = d != 0.f ? __frcp_rn(d) : 0.f;
            const int q = min(15, static_cast<int>(__fadd_rn(__fmul_rn(x, id), 8.5f)));
            const int q_hi = __shfl_xor_sync(0xffffffffu, q, 16);  // lane i < 16 gets value i + 16
            uint8_t* blk = out + 18 * b;
            if (lane < 16) blk[2 + lane] = static_cast<uint8_t>(q | (q_hi << 4));
            if (lane == 0) *reinterpret_cast<__half*>(blk) = __float2half_rn(d);
        }
    }
}

}  // namespace
}  // namespace cudak

void cuda_rerotate_keys(DType type, const void* src, void* dst, int64_t n_rows, size_t row_stride, int head_dim, int n_rot,
                        float freq_base, RopeMode mode, int32_t delta, void* stream) {
    using namespace cudak;
    const char* fn = "cuda_rerotate_keys";
    if (type != DType::F32 && type != DType::F16 && type != DType::Q8_0 && type != DType::Q4_0)
        throw_arg(fn, "key rows must be f32, f16, q8_0 or q4_0");
    const int block = static_cast<int>(type_info(type).block_size);
    if (head_dim <= 0 || head_dim > kMaxHeadDim || head_dim % block != 0) throw_arg(fn, "bad head_dim for this type");
    if (row_stride < cuda_row_bytes(type, head_dim)) throw_arg(fn, "row_stride smaller than a row");
    if (n_rot <= 0 || n_rot % 2 != 0 || n_rot > head_dim) throw_arg(fn, "n_rot must be even and in 2..head_dim");
    if (!(freq_base > 0.f)) throw_arg(fn, "freq_base must be > 0");
    if (mode != RopeMode::Norm && mode != RopeMode::Neox) throw_arg(fn, "mode must be Norm (0) or Neox (2)");
    if (n_rows < 0 || n_rows > 0x7FFFFFFF) throw_arg(fn, "bad n_rows");
    if (n_rows == 0) return;
    // The kernel reads and writes f32 words (f32 rows) or f16 words (the others: values, block scales);
    // a misaligned access traps, and a trap poisons the context for every later call.
    const size_t word = type == DType::F32 ? 4 : 2;
    if (!src || !dst) throw_arg(fn, "null rows");
    if (!aligned(src, word) || !aligned(dst, word) || row_stride % word != 0)
        throw_arg(fn, "rows or row_stride misaligned for the key type");
    const size_t span = static_cast<size_t>(n_rows - 1) * row_stride + cuda_row_bytes(type, head_dim);
    const uintptr_t s0 = reinterpret_cast<uintptr_t>(src), d0 = reinterpret_cast<uintptr_t>(dst);
    if (src != dst && s0 < d0 + span && d0 < s0 + span) throw_arg(fn, "src and dst overlap (in place needs src == dst)");
    if (delta == 0 && src == dst) return;
    rerotate_kernel<<<static_cast<unsigned>(n_rows), 32, 0, as_stream(stream)>>>(
        static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), row_stride, static_cast<int>(type), head_dim, n_rot,
        mode == RopeMode::Neox ? 1 : 0, rope_steps(n_rot, freq_base, 1.0), delta);
    check_launch("rerotate_kernel");
}

}  // namespace x2l
