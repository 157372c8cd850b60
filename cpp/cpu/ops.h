// CPU kernels used by the model forward passes: matmul over quantized weights, norms, RoPE,
// activations. Multithreaded through ThreadPool; the SIMD lives in quant.cpp's dot products.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "cpu/quant.h"
#include "core/threadpool.h"

namespace x2l {

// Allocator for work buffers the kernels stream with 64-byte vector loads: a plain std::vector's
// offset within a cache line depends on the heap's history, which made the same run 15 % slower or
// faster depending on allocation order.
template <class T>
struct CacheLineAllocator {
    using value_type = T;
    CacheLineAllocator() = default;
    template <class U>
    CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) noexcept { ::operator delete(p, std::align_val_t(64)); }
    template <class U>
    bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
    template <class U>
    bool operator!=(const CacheLineAllocator<U>&) const noexcept { return false; }
};
template <class T>
using aligned_vector = std::vector<T, CacheLineAllocator<T>>;

// A 2-D weight matrix as stored in GGUF: n_out rows of n_in values (ggml ne = [n_in, n_out]).
struct Weight {
    DType type = DType::F32;
    int64_t n_in = 0, n_out = 0;
    const uint8_t* data = nullptr;
    size_t row_bytes = 0;
    const uint8_t* row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
    size_t nbytes() const { return row_bytes * static_cast<size_t>(n_out); }
    bool valid() const { return data != nullptr; }
};

// One matmul target in a fused call: y [n_tokens, w.n_out] = x [n_tokens, n_in] · w^T (+ bias).
struct MatmulJob {
    const Weight* w;
    float* y;
    const float* bias = nullptr;  // [n_out] or null
};

// Runs several matmuls that share the same input x [n_tokens, n_in] in one parallel region: x is
// converted once to each weight's dot_type (scratch holds those rows), then output rows are split
// across threads. Fusing q/k/v and gate/up halves the number of thread wake-ups per layer.
void matmul(ThreadPool& pool, const float* x, int64_t n_tokens, int64_t n_in, const MatmulJob* jobs, int n_jobs,
            aligned_vector<uint8_t>& scratch);
inline void matmul(ThreadPool& pool, const Weight& w, const float* x, int64_t n_tokens, float* y,
                   aligned_vector<uint8_t>& scratch, const float* bias = nullptr) {
    MatmulJob j{&w, y, bias};
    matmul(pool, x, n_tokens, w.n_in, &j, 1, scratch);
}

// y[i] = x[i] / rms(x) * w[i]  (y may alias x)
void rmsnorm(const float* x, const float* w, float* y, int64_t n, float eps);
// y = (x - mean) / sqrt(var + eps) * w + b
void layernorm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps);

enum class RopeType { Norm = 0, Neox = 2 };  // ggml ids: NORM rotates adjacent pairs, NEOX rotates halves

// Rotates n_heads heads of head_dim values (first rope_dim dims of each head) in place at position pos.
// inv_freq: [rope_dim / 2] with inv_freq[i] = base^(-2i / rope_dim).
void rope(float* x, int n_heads, int head_dim, int rope_dim, int32_t pos, const float* inv_freq, RopeType type);

// RoPE parameters of a model, for re-rotating cached keys to new positions.
struct RopeSpec {
    const float* inv_freq = nullptr;  // [rope_dim / 2]
    int rope_dim = 0;
    RopeType type = RopeType::Norm;
};

// In-place softmax over n values; returns nothing, handles -inf entries.
void softmax(float* x, int64_t n);

// e^(x - n ln2) for the integer-valued n = round(x / ln2): Cephes's degree-6 polynomial on the
// remainder (ln2 split in two for precision). T is float or a GCC float vector (the attention kernel),
// so the scalar and vector exp share one set of coefficients.
template <class T>
inline T exp_remainder(T x, T n) {
    const T r = x - n * 0.693359375f + n * 2.12194440e-4f;
    T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * r * r + r + 1.0f;
}

// exp(x) for x <= 0 to ~2 ulp (Cephes-style: 2^n by exponent bits times exp_remainder). Inline and
// branch-free so loops over it vectorize; x < -87 gives ~0, not 0.
inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = std::floor(x * 1.44269504089f + 0.5f);
    const float p = exp_remainder(x, n);
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

void silu_mul(float* gate, const float* up, int64_t n);  // gate = silu(gate) * up
void gelu_erf(float* x, int64_t n);
void gelu_tanh(float* x, int64_t n);
void add(float* y, const float* x, int64_t n);  // y += x

}  // namespace x2l
