// x2l-edge CUDA emulator: the warp matrix (WMMA) subset of <mma.h> that cpp/cuda uses (see cuda_runtime.h).
//
// The operations are warp-collective on a GPU, each lane holding a share of the tile. Here lane 0 of the
// warp holds the whole tile and does the whole operation, the other lanes do nothing: after
// store_matrix_sync the memory holds the tile either way, and code that reads it back does so after a
// barrier. The real API's rules that a kernel can break are checked (pointers 256-bit aligned, ldm a
// multiple of 16 bytes): a violation is a sticky launch failure, as the fault it would be. Products are
// of f16 values, exact in f32, and accumulate in f32, as on tensor cores (up to the order of the sums).
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int n_rows = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int n_cols = std::is_same<Use, matrix_a>::value ? K : N;
    static constexpr int num_elements = n_rows * n_cols;
    float v[num_elements];  // [n_rows][n_cols] as values (lane 0 only)
};

namespace detail {
inline bool leader() {
    const uint3& t = ::x2l_emu::thread_idx();
    const dim3& b = ::x2l_emu::block_dim();
    return (t.x + b.x * (t.y + b.y * t.z)) % 32 == 0;
}
inline void check(const void* p, unsigned ldm, size_t elem_bytes) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::x2l_emu::device_fault("wmma: a matrix pointer is not 256-bit aligned");
    if ((ldm * elem_bytes) % 16 != 0) ::x2l_emu::device_fault("wmma: ldm is not a multiple of 16 bytes");
}
inline float value(float x) { return x; }
inline float value(__half x) { return __half2float(x); }
template <class L>
constexpr bool row_major_v() { return std::is_same<L, row_major>::value; }
}  // namespace detail

template <class Use, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V x) {
    if (!detail::leader()) return;
    for (float& e : f.v) e = detail::value(x);
}

template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
    static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
    if (!detail::leader()) return;
    detail::check(p, ldm, sizeof(T));
    using Fr = fragment<Use, M, N, K, T, L>;
    for (int r = 0; r < Fr::n_rows; ++r)
        for (int c = 0; c < Fr::n_cols; ++c)
            f.v[r * Fr::n_cols + c] = detail::value(detail::row_major_v<L>() ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
    if (!detail::leader()) return;
    detail::check(p, ldm, sizeof(float));
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) f.v[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
    if (!detail::leader()) return;
    float out[M * N];
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float s = c.v[i * N + j];
            for (int k = 0; k < K; ++k) s += a.v[i * K + k] * b.v[k * N + j];
            out[i * N + j] = s;
        }
    for (int i = 0; i < M * N; ++i) d.v[i] = out[i];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
    if (!detail::leader()) return;
    detail::check(p, ldm, sizeof(float));
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r * N + c];
}

}  // namespace wmma
}  // namespace nvcuda
