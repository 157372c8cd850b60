// The vision tower of Qwen2-VL and Qwen2.5-VL (clip.projector_type qwen2vl_merger / qwen2.5vl_merger,
// llama.cpp's mmproj layout: docs/families.md §2-§3), run on the CPU:
//   frames paired in time (temporal patch 2; an image, or the odd last frame, is repeated), the Conv3D
//   patch embedding as one matmul over [v.patch_embd.weight | v.patch_embd.weight.1], 2-D rotary on the
//   patch (row, col), pre-norm blocks (Qwen2-VL: LayerNorm + quick_gelu MLP; Qwen2.5-VL: RMSNorm + SwiGLU,
//   window attention except every n_wa_pattern-th block), attention never crossing temporal pairs,
//   then the merger: norm (v.post_ln), 2x2 merge windows concatenated, mm.0 -> GELU -> mm.2.
// Images and videos have any size that is a multiple of patch * merge (28): the caller resizes.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/gguf.h"
#include "core/interrupt.h"
#include "core/threadpool.h"
#include "cpu/mrope.h"
#include "cpu/ops.h"

namespace x2l {

struct QwenVisionConfig {
    bool qwen25 = false;      // Qwen2.5-VL: RMSNorm, SwiGLU, window attention
    int patch = 14, merge = 2, temporal = 2;
    int width = 0, n_ff = 0, n_head = 0, head_dim = 0, n_layer = 0;
    int n_embd = 0;           // merger output = the LLM's width
    int n_wa_pattern = 0;     // Qwen2.5: block i attends fully iff (i + 1) % n_wa_pattern == 0
    int window_size = 112;    // Qwen2.5: attention window side in pixels (not in llama.cpp's mmproj)
    float eps = 1e-6f;
    std::vector<float> image_mean, image_std;  // [3] each
};

struct QwenVisionLayer {
    std::vector<float> ln1_w, ln1_b, ln2_w, ln2_b;  // [width] (biases empty for RMSNorm)
    Weight wq, wk, wv, wo;
    std::vector<float> bq, bk, bv, bo;
    Weight w_gate, w_up, w_down;                    // w_gate only for SwiGLU
    std::vector<float> b_gate, b_up, b_down;
};

class QwenVisionEncoder {
  public:
    // FormatError naming the key or tensor that is missing or malformed. Weights point into f's
    // mapping: f must outlive the encoder.
    static std::unique_ptr<QwenVisionEncoder> load(const GGUFFile& f);
    static bool handles(const GGUFFile& f);  // clip.projector_type is one of Qwen's mergers

    const QwenVisionConfig& config() const { return cfg_; }
    size_t weight_bytes() const { return weight_bytes_; }
    // Output tokens of n_frames frames of height x width pixels (the merged grid of every temporal pair).
    int64_t n_tokens(int64_t n_frames, int height, int width) const;

    // frames [n_frames, 3, height, width] normalized pixels (an image: n_frames = 1) -> out
    // [n_tokens(...), n_embd]: per temporal pair, one token per 2x2 merge window in raster order.
    // Throws Error on sizes that are not multiples of patch * merge. interrupt (may be null) is checked
    // before every block of every temporal pair (Cancelled; out is then partly written).
    void encode(ThreadPool& pool, const float* frames, int64_t n_frames, int height, int width, float* out,
                const Interrupt* interrupt = nullptr) const;

  private:
    friend class CudaQwenVision;  // reads the weights and the rotary table to upload them
    QwenVisionEncoder() = default;
    struct Scratch;
    void run_pair(ThreadPool& pool, Scratch& s, const float* pair, int height, int width, float* out,
                  const Interrupt* interrupt) const;
    void attention(ThreadPool& pool, Scratch& s, int64_t n, const std::vector<int32_t>& seg_len) const;

    QwenVisionConfig cfg_;
    std::vector<float> patch_w_data_;  // [width, 3 * temporal * patch^2], (channel, frame, y, x) columns
    Weight patch_w_;
    std::vector<QwenVisionLayer> layers_;
    std::vector<float> post_w_, post_b_;  // merger norm [width]
    Weight mm0_, mm2_;
    std::vector<float> mm0_b_, mm2_b_;
    RopeAxes rope_;
    size_t weight_bytes_ = 0;
};

}  // namespace x2l
