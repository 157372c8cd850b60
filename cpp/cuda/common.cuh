// Error checking and small device helpers shared by the CUDA sources (private to cpp/cuda).
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
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

// The device's opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin: 99 KB
// on sm_86/89, 163 KB on sm_80/87, 227 KB on sm_90, 64 KB on sm_75), cached per device.
size_t smem_optin(int dev);
// Lets `func` launch with `bytes` of dynamic shared memory on the current device: false when that is
// above the device's opt-in limit (the caller picks smaller tiles); the attribute is set once per
// (kernel, device).
bool allow_dynamic_smem(const void* func, size_t bytes, const char* what);

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

// RoPE in FP32 (FP64 runs at 1/64 rate on consumer GPUs and Orin). The angle pos * step reaches ~1e5
// rad at long contexts, where one float rounding of the step or of the product is ~1e-2 rad off. So the
// step of rotated pair i, freq_scale * base^(-2i/n_rot), is computed once on the host in double and
// passed as a float pair hi + lo; the device forms pos * (hi + lo) exactly enough (an FMA's error term)
// and reduces it mod 2π with a two-part 2π (Cody-Waite); on |r| <= π the SFU's __sincosf is within
// 2^-21.4 (absolute) and has no FP64 slow path, unlike sincosf.
constexpr int kMaxRopePairs = 128;  // n_rot <= 256
struct RopeSteps {
    float hi[kMaxRopePairs];
    float lo[kMaxRopePairs];
};

// The per-pair frequency (rounded to float, as the CPU and transformers hold it) and position axis of a
// multi-axis rotary (M-RoPE); a kernel argument like RopeSteps.
struct RopeAxesTable {
    float freq[kMaxRopePairs];
    uint8_t axis[kMaxRopePairs];
};

inline RopeSteps rope_steps(int n_rot, double freq_base, double freq_scale) {
    RopeSteps st{};
    const double log2_base = std::log2(freq_base);
    for (int i = 0; i < n_rot / 2 && i < kMaxRopePairs; ++i) {
        const double step = freq_scale * std::exp2(-2.0 * i / n_rot * log2_base);
        st.hi[i] = static_cast<float>(step);
        st.lo[i] = static_cast<float>(step - static_cast<double>(st.hi[i]));
    }
    return st;
}

// sin and cos of pos * (hi + lo), accurate to ~1e-6 rad for |pos| < 2^24.
__device__ __forceinline__ void rope_sincos(int32_t pos, float hi, float lo, float* s, float* c) {
    constexpr float kTwoPiHi = 6.28318548202514648f;      // float(2π): k * kTwoPiHi - p is exact below
    constexpr float kTwoPiLo = -1.74845553146951715e-07f;  // 2π - kTwoPiHi
    const float p = static_cast<float>(pos);              // exact: |pos| < 2^24
    const float a = p * hi;
    const float a_err = fmaf(p, hi, -a);                  // a + a_err == p * hi exactly
    const float a_lo = fmaf(p, lo, a_err);
    const float k = rintf(a * 0.159154943091895336f);
    float r = fmaf(-k, kTwoPiHi, a);  // exact: both are multiples of ulp(kTwoPiHi) and |r| < 8
    r = fmaf(-k, kTwoPiLo, r) + a_lo;
    __sincosf(r, s, c);
}

}  // namespace cudak
}  // namespace x2l
