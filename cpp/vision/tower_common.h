// Pieces every CPU vision tower uses: the quick_gelu activation, row-parallel elementwise work, and the
// image mean/std keys of a GGUF file.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/gguf.h"
#include "core/threadpool.h"

namespace x2l {

inline void quick_gelu(float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] / (1.0f + std::exp(-1.702f * x[i]));
}

// Below this many floats of work a parallel region costs more than it saves (tiny test models).
constexpr int64_t kMinParallelWork = 1 << 14;

// Row-parallel elementwise work over n rows of row_len values.
inline void per_row(ThreadPool& pool, int64_t n, int64_t row_len, const std::function<void(int64_t)>& fn) {
    if (n * row_len < kMinParallelWork) {
        for (int64_t r = 0; r < n; ++r) fn(r);
        return;
    }
    pool.parallel_for(n, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) fn(r);
    });
}

// clip.vision.image_mean / image_std: 3 finite values, dflt for each when the key is absent (FormatError otherwise).
std::vector<float> image_norm_key(const GGUFFile& f, const std::string& key, float dflt);

}  // namespace x2l
