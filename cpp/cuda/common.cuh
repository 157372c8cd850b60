// Error checking and small device helpers shared by the CUDA sources (private to cpp/cuda).
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace x2l {
namespace cudak {

// Throws x2l::Error (x2l::BudgetError for out-of-memory) with cudaGetErrorString's text; clears the
// runtime's last-error state so that a non-sticky failure does not poison later calls.
[[noreturn]] void throw_cuda(cudaError_t e, const char* what);

inline void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw_cuda(e, what);
}
// After a <<<>>> launch: catches bad configurations (grid too large, too much shared memory...).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// Argument errors (bad shapes, alignment) are reported the same way as CUDA errors.
[[noreturn]] void throw_arg(const char* fn, const char* msg);

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

inline unsigned grid_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

// f16 operand of the tensor-core kernels. Values past f16's range (LLMs' rare "massive activations" in
// the thousands stay well inside it) saturate at +-65504 instead of turning into inf and NaN sums.
__device__ __forceinline__ __half to_half_sat(float v) { return __float2half_rn(fminf(fmaxf(v, -65504.f), 65504.f)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

}  // namespace cudak
}  // namespace x2l
