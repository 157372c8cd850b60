// Rotary embeddings whose frequency pairs take their angle from different position axes: the M-RoPE
// of Qwen2-VL / Qwen2.5-VL's LLM (axes t, h, w over consecutive sections of the head_dim/2 pairs) and
// the 2-D rotary of their ViT (axes row, col). Both rotate NEOX pairs (i, i + head_dim/2). Also the
// LLM's per-token (t, h, w) positions of a prompt with image/video runs. Pure functions: the model
// computes cos/sin once per forward and applies them to q and k of every layer.
//
// References: tests/vlm_numpy.py (mrope_positions, mrope_angles, vision_rope_angles, rope_neox),
// checked against transformers; docs/families.md §2.
#pragma once
#include <cstdint>
#include <vector>

namespace x2l {

// Frequency and position axis of every rotated pair of a head.
struct RopeAxes {
    int head_dim = 0;
    int n_axes = 0;
    std::vector<float> freq;    // [head_dim / 2]
    std::vector<uint8_t> axis;  // [head_dim / 2], which row of the positions drives the pair
};

// LLM M-RoPE: pair j has frequency theta^(-2j / head_dim) and takes axis 0 (t) for j < s[0], axis 1 (h)
// for j < s[0] + s[1], axis 2 (w) after. sections (rope.dimension_sections' first three) must be
// non-negative and sum to head_dim / 2. Throws std::invalid_argument otherwise.
RopeAxes mrope_axes(int head_dim, float theta, const int sections[3]);

// Qwen ViT 2-D rotary: pairs j < head_dim/4 rotate by the patch row, pairs head_dim/4 + j by the patch
// column, both with frequency theta^(-2j / (head_dim/2)). head_dim must be a multiple of 4.
RopeAxes vision_rope_axes(int head_dim, float theta = 10000.0f);

// cos/sin [n_tokens, head_dim/2] of the angles pos[axis(j)][t] * freq[j] (the product rounded to float,
// as every runtime computes it). pos: n_axes rows of n_tokens positions.
void rope_axes_cos_sin(const RopeAxes& ra, const int32_t* pos, int64_t n_tokens, float* cos, float* sin);

// Rotates x [n_tokens, n_heads, head_dim] in place: (x_j, x_{j+d/2}) -> (x_j c - x_{j+d/2} s, x_{j+d/2} c + x_j s)
// with c, s the token's cos/sin of pair j.
void rope_neox_apply(float* x, int64_t n_tokens, int n_heads, int head_dim, const float* cos, const float* sin);

// ---------------------------------------------------------------- M-RoPE positions of a prompt

enum class TokenKind : uint8_t { Text = 0, Image = 1, Video = 2 };

// Where text continues after an image or video run starting at running position S:
//   MaxPlusOne: one past the run's largest position (Qwen's original rule, the released models');
//   Spatial:    S + max(h, w) / merge (transformers >= 5.x; llama.cpp's per-image advance).
enum class TextAfterMedia { MaxPlusOne, Spatial };

// The patch grid (before the spatial merge) of one image or video; seconds_per_grid = temporal patch
// size / sampling fps (videos only, used when tokens_per_second > 0).
struct MediaGrid {
    int32_t t = 1, h = 0, w = 0;
    float seconds_per_grid = 1.0f;
};

// Fills pos [3, n] (rows t, h, w) for a prompt whose tokens have the given kinds: each maximal run of
// Image (Video) tokens is the next grid, t*h*w/merge^2 tokens in t-major raster order over the merged
// grid, positions (S + T(ti), S + hi, S + wi) with T(ti) = ti, or for videos when tokens_per_second > 0
// trunc(ti * (tokens_per_second * seconds_per_grid)) in float; text tokens take (P, P, P).
// Returns delta = max position + 1 - n (decode token i >= n sits at i + delta on all axes).
// Throws std::invalid_argument when a run's length does not match its grid, a grid is not divisible
// by merge, or the number of runs and grids differ.
int64_t mrope_positions(const TokenKind* kinds, int64_t n, const MediaGrid* grids, int n_grids, int merge,
                        float tokens_per_second, TextAfterMedia rule, int32_t* pos);

}  // namespace x2l
