#include "cpu/mrope.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace x2l {

namespace {

// theta^(-2j / dim) for j < dim/2, computed in double and rounded once (as torch's float inv_freq).
float inv_freq(int j, int dim, float theta) {
    return static_cast<float>(1.0 / std::pow(static_cast<double>(theta), 2.0 * j / dim));
}

}  // namespace

RopeAxes mrope_axes(int head_dim, float theta, const int sections[3]) {
    if (head_dim <= 0 || head_dim % 2) throw std::invalid_argument("M-RoPE head_dim must be positive and even");
    if (!(theta > 0.0f)) throw std::invalid_argument("M-RoPE theta must be positive");
    const int half = head_dim / 2;
    if (sections[0] < 0 || sections[1] < 0 || sections[2] < 0 || sections[0] + sections[1] + sections[2] != half) {
        throw std::invalid_argument("M-RoPE sections [" + std::to_string(sections[0]) + ", " +
                                    std::to_string(sections[1]) + ", " + std::to_string(sections[2]) +
                                    "] must be non-negative and sum to head_dim/2 = " + std::to_string(half));
    }
    RopeAxes ra;
    ra.head_dim = head_dim;
    ra.n_axes = 3;
    ra.freq.resize(half);
    ra.axis.resize(half);
    for (int j = 0; j < half; ++j) {
        ra.freq[j] = inv_freq(j, head_dim, theta);
        ra.axis[j] = static_cast<uint8_t>(j < sections[0] ? 0 : j < sections[0] + sections[1] ? 1 : 2);
    }
    return ra;
}

RopeAxes vision_rope_axes(int head_dim, float theta) {
    if (head_dim <= 0 || head_dim % 4) throw std::invalid_argument("ViT 2-D rotary needs head_dim a multiple of 4");
    if (!(theta > 0.0f)) throw std::invalid_argument("ViT rotary theta must be positive");
    const int quarter = head_dim / 4;
    RopeAxes ra;
    ra.head_dim = head_dim;
    ra.n_axes = 2;
    ra.freq.resize(2 * quarter);
    ra.axis.resize(2 * quarter);
    for (int j = 0; j < quarter; ++j) {
        ra.freq[j] = ra.freq[quarter + j] = inv_freq(j, head_dim / 2, theta);
        ra.axis[j] = 0;            // row
        ra.axis[quarter + j] = 1;  // column
    }
    return ra;
}

void rope_axes_cos_sin(const RopeAxes& ra, const int32_t* pos, int64_t n_tokens, float* cos, float* sin) {
    const int half = ra.head_dim / 2;
    for (int64_t t = 0; t < n_tokens; ++t) {
        for (int j = 0; j < half; ++j) {
            const float angle = static_cast<float>(pos[ra.axis[j] * n_tokens + t]) * ra.freq[j];
            cos[t * half + j] = std::cos(angle);
            sin[t * half + j] = std::sin(angle);
        }
    }
}

void rope_neox_apply(float* x, int64_t n_tokens, int n_heads, int head_dim, const float* cos, const float* sin) {
    const int half = head_dim / 2;
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float* c = cos + t * half;
        const float* s = sin + t * half;
        for (int h = 0; h < n_heads; ++h) {
            float* v = x + (t * n_heads + h) * head_dim;  // [head_dim]
            for (int j = 0; j < half; ++j) {
                const float a = v[j], b = v[j + half];
                v[j] = a * c[j] - b * s[j];
                v[j + half] = b * c[j] + a * s[j];
            }
        }
    }
}

int64_t mrope_positions(const TokenKind* kinds, int64_t n, const MediaGrid* grids, int n_grids, int merge,
                        float tokens_per_second, TextAfterMedia rule, int32_t* pos) {
    if (merge < 1) throw std::invalid_argument("merge size must be >= 1");
    int32_t* pt = pos;
    int32_t* ph = pos + n;
    int32_t* pw = pos + 2 * n;
    int64_t cur = 0;  // running position
    int next_grid = 0;
    int32_t max_pos = -1;
    for (int64_t i = 0; i < n;) {
        const TokenKind kind = kinds[i];
        int64_t j = i;
        while (j < n && kinds[j] == kind) ++j;
        if (kind == TokenKind::Text) {
            for (int64_t k = i; k < j; ++k) pt[k] = ph[k] = pw[k] = static_cast<int32_t>(cur + (k - i));
            cur += j - i;
        } else {
            if (next_grid >= n_grids) throw std::invalid_argument("more media runs in the prompt than grids");
            const MediaGrid& g = grids[next_grid++];
            if (g.t < 1 || g.h < 1 || g.w < 1 || g.h % merge || g.w % merge) {
                throw std::invalid_argument("media grid " + std::to_string(g.t) + "x" + std::to_string(g.h) + "x" +
                                            std::to_string(g.w) + " is empty or not divisible by the merge size");
            }
            const int64_t gh = g.h / merge, gw = g.w / merge;
            if (j - i != g.t * gh * gw) {
                throw std::invalid_argument("media run of " + std::to_string(j - i) + " tokens for a grid that needs " +
                                            std::to_string(g.t * gh * gw));
            }
            const bool scaled = kind == TokenKind::Video && tokens_per_second > 0.0f;
            const float interval = tokens_per_second * g.seconds_per_grid;
            int64_t run_max = cur + std::max(gh, gw) - 1, k = i;
            for (int64_t ti = 0; ti < g.t; ++ti) {
                const int64_t tpos = scaled ? static_cast<int64_t>(static_cast<float>(ti) * interval) : ti;
                run_max = std::max(run_max, cur + tpos);
                for (int64_t hi = 0; hi < gh; ++hi) {
                    for (int64_t wi = 0; wi < gw; ++wi, ++k) {
                        pt[k] = static_cast<int32_t>(cur + tpos);
                        ph[k] = static_cast<int32_t>(cur + hi);
                        pw[k] = static_cast<int32_t>(cur + wi);
                    }
                }
            }
            cur = rule == TextAfterMedia::MaxPlusOne ? run_max + 1 : cur + std::max(gh, gw);
        }
        i = j;
    }
    if (next_grid != n_grids) throw std::invalid_argument("fewer media runs in the prompt than grids");
    for (int64_t k = 0; k < 3 * n; ++k) max_pos = std::max(max_pos, pos[k]);
    return n ? static_cast<int64_t>(max_pos) + 1 - n : 0;
}

}  // namespace x2l
