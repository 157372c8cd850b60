#include "cpu/ops.h"

#include <algorithm>
#include <cmath>

#include "core/common.h"
#include "cpu/gemm.h"

namespace x2l {

void matmul(ThreadPool& pool, const float* x, int64_t n_tokens, int64_t n_in, const MatmulJob* jobs, int n_jobs,
            aligned_vector<uint8_t>& scratch) {
    // Convert the activations once per distinct dot type: quantized rows [n_tokens, act_row] for
    // the vec_dot path, and the gemm layout when a job of that type has a tiled kernel.
    DType act_types[4];
    size_t act_offset[4], act_row[4], gemm_offset[4];
    bool act_gemm[4];
    int n_act = 0;
    size_t total = 0;
    int job_act[16];
    bool job_gemm[16];
    if (n_jobs > 16) throw Error("matmul: too many fused jobs");
    for (int j = 0; j < n_jobs; ++j) {
        DType at = dot_type(jobs[j].w->type);
        int k = 0;
        while (k < n_act && act_types[k] != at) ++k;
        if (k == n_act) {
            act_types[k] = at;
            act_row[k] = at == DType::F32 ? 0 : row_bytes(at, n_in);
            act_gemm[k] = false;
            ++n_act;
        }
        job_act[j] = k;
        job_gemm[j] = gemm_supported(jobs[j].w->type);
        act_gemm[k] = act_gemm[k] || job_gemm[j];
    }
    for (int k = 0; k < n_act; ++k) {
        act_offset[k] = total;
        total += act_row[k] * static_cast<size_t>(n_tokens);
        gemm_offset[k] = total;
        if (act_gemm[k]) total += gemm_acts_bytes(act_types[k], n_tokens, n_in);
    }
    if (scratch.size() < total) scratch.resize(total);
    GemmActs gacts[4];
    for (int k = 0; k < n_act; ++k) {
        const DType at = act_types[k];
        if (act_gemm[k]) gacts[k] = gemm_acts(at, x, n_tokens, n_in, scratch.data() + gemm_offset[k]);
        if (at == DType::F32) continue;
        uint8_t* dst = scratch.data() + act_offset[k];
        const size_t rb = act_row[k];
        const bool pack = act_gemm[k];
        const GemmActs& ga = gacts[k];
        auto convert = [&](int64_t t) {
            quantize_row(at, x + t * n_in, dst + t * rb, n_in);
            if (pack) gemm_pack_token(ga, t, dst + t * rb);
        };
        if (n_tokens == 1) {
            convert(0);
        } else {
            pool.parallel_for(n_tokens, [&](int64_t b, int64_t e) {
                for (int64_t t = b; t < e; ++t) convert(t);
            });
        }
    }

    int64_t total_rows = 0;
    for (int j = 0; j < n_jobs; ++j) total_rows += jobs[j].w->n_out;
    // Rows are split in blocks that match the tiled kernels' row groups (16 rows when several
    // tokens share each weight load, 8 for decode); the vec_dot path keeps a block of rows in L1
    // while every token uses it. No output's value depends on the split (see gemm.h).
    const int64_t kRowBlock = n_tokens == 1 ? 8 : 16;
    constexpr int64_t kRowBlockMax = 16;
    const int64_t kTokBlock = 64;

    pool.run([&](int ith, int nth) {
        // Contiguous, block-aligned share of the concatenated output rows.
        int64_t n_blocks = (total_rows + kRowBlock - 1) / kRowBlock;
        int64_t per = (n_blocks + nth - 1) / nth;
        int64_t r0 = std::min(total_rows, ith * per * kRowBlock);
        int64_t r1 = std::min(total_rows, (ith + 1) * per * kRowBlock);
        int64_t base = 0;
        for (int j = 0; j < n_jobs && r0 < r1; ++j) {
            const Weight& w = *jobs[j].w;
            int64_t jb = std::max(r0, base), je = std::min(r1, base + w.n_out);
            if (jb < je) {
                float* y = jobs[j].y;
                const float* bias = jobs[j].bias;
                const int64_t n_out = w.n_out;
                if (job_gemm[j]) {
                    // Tiled kernels: every token of the call against these rows.
                    gemm(w.type, w.data, w.row_bytes, jb - base, je - base, gacts[job_act[j]], y, n_out, bias);
                } else {
                    const uint8_t* act = act_types[job_act[j]] == DType::F32
                                             ? reinterpret_cast<const uint8_t*>(x)
                                             : scratch.data() + act_offset[job_act[j]];
                    size_t arow = act_types[job_act[j]] == DType::F32 ? n_in * sizeof(float) : act_row[job_act[j]];
                    float tmp[kRowBlockMax];
                    for (int64_t rb = jb - base; rb < je - base; rb += kRowBlock) {
                        int64_t re = std::min(rb + kRowBlock, je - base);
                        for (int64_t tb = 0; tb < n_tokens; tb += kTokBlock) {
                            int64_t te = std::min(tb + kTokBlock, n_tokens);
                            for (int64_t t = tb; t < te; ++t) {
                                const uint8_t* a = act + t * arow;
                                float* yt = y + t * n_out;
                                // Several rows per call: the kernel reuses the activation block across rows.
                                vec_dot_rows(w.type, n_in, w.row(rb), w.row_bytes, re - rb, a, tmp);
                                for (int64_t r = rb; r < re; ++r) yt[r] = bias ? tmp[r - rb] + bias[r] : tmp[r - rb];
                            }
                        }
                    }
                }
            }
            base += w.n_out;
        }
    });
}

void rmsnorm(const float* x, const float* w, float* y, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    float scale = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale * w[i];
}

void layernorm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps) {
    double mean = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= static_cast<double>(n);
    double var = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        double d = x[i] - mean;
        var += d * d;
    }
    var /= static_cast<double>(n);
    float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
    float m = static_cast<float>(mean);
    for (int64_t i = 0; i < n; ++i) {
        float v = (x[i] - m) * inv;
        y[i] = v * (w ? w[i] : 1.0f) + (b ? b[i] : 0.0f);
    }
}

void rope(float* x, int n_heads, int head_dim, int rope_dim, int32_t pos, const float* inv_freq, RopeType type) {
    const int half = rope_dim / 2;
    // cos/sin once per position, shared by all heads. head_dim <= 256 in every supported model.
    float cs[128], sn[128];
    for (int i = 0; i < half; ++i) {
        float theta = static_cast<float>(pos) * inv_freq[i];
        cs[i] = std::cos(theta);
        sn[i] = std::sin(theta);
    }
    for (int h = 0; h < n_heads; ++h) {
        float* v = x + static_cast<int64_t>(h) * head_dim;
        if (type == RopeType::Neox) {
            for (int i = 0; i < half; ++i) {
                float a = v[i], b = v[i + half];
                v[i] = a * cs[i] - b * sn[i];
                v[i + half] = a * sn[i] + b * cs[i];
            }
        } else {
            for (int i = 0; i < half; ++i) {
                float a = v[2 * i], b = v[2 * i + 1];
                v[2 * i] = a * cs[i] - b * sn[i];
                v[2 * i + 1] = a * sn[i] + b * cs[i];
            }
        }
    }
}

void softmax(float* x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
    if (mx == -INFINITY) {
        for (int64_t i = 0; i < n; ++i) x[i] = 0.0f;
        return;
    }
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        float e = std::exp(x[i] - mx);
        x[i] = e;
        sum += e;
    }
    float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void silu_mul(float* gate, const float* up, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        float g = gate[i];
        gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

void gelu_erf(float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
}

void gelu_tanh(float* x, int64_t n) {
    const float k = 0.79788456080286536f;  // sqrt(2/pi)
    for (int64_t i = 0; i < n; ++i) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
}

void add(float* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace x2l
