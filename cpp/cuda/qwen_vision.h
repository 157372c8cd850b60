// Qwen2-VL / Qwen2.5-VL's vision tower on a CUDA device (the same forward as cpp/vision/qwen.cpp, built
// from the kernels of cuda/backend.h). Per temporal pair of frames:
//   pixel rows (host, qwen_patch_rows, put in window-major merge-unit order) -> patch matmul (the Conv3D's
//   two 2-D kernels side by side) -> blocks: norm -> q/k/v -> 2-D rotary (row, col) -> attention inside
//   each window (Qwen2.5's windowed blocks) or over the pair -> out -> norm -> MLP (SwiGLU / quick_gelu)
//   -> merger: norm, merge units as rows, mm.0 -> GELU -> mm.2 -> tokens back to raster order (host).
// The activations are sized for the largest frame seen so far.
//
// The Qwen tower's CUDA executor (vision/executor.h); backends.cpp makes it.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/llm.h"
#include "cuda/vision_block.h"
#include "vision/executor.h"
#include "vision/qwen.h"

namespace x2l {

class CudaQwenVision final : public QwenVisionExecutor {
  public:
    // Uploads the encoder's weights to `device`. Error for layouts the kernels do not read (naming the
    // tensor), BudgetError when device memory runs out. `enc` must outlive this.
    CudaQwenVision(const QwenVisionEncoder& enc, int device);
    CudaQwenVision(const CudaQwenVision&) = delete;
    CudaQwenVision& operator=(const CudaQwenVision&) = delete;

    void encode(const float* frames, int64_t n_frames, int height, int width, float* out,
                const Interrupt* interrupt) override;
    std::string device() const override { return "cuda:" + std::to_string(device_); }
    size_t device_bytes() const override;

  private:
    struct Layer : CudaVisionBlock {
        CudaDeviceBuffer b_gate;  // SwiGLU (Qwen2.5) only
        CudaMatrix w_gate;
    };
    // Activations for n tokens of one temporal pair (reallocated when a larger frame comes).
    void reserve(int64_t n);
    // The segments of this frame size: entry 0 the whole pair, then one per window (Qwen2.5), over k_ / v_.
    void set_layout(int hp, int wp);
    void run_pair(const float* pair, int height, int width, float* out, const Interrupt* interrupt);
    void norm(const CudaDeviceBuffer& w, const CudaDeviceBuffer& b, const float* x, float* y, int64_t n);
    template <class Self>
    static auto activations(Self& self) {
        return std::array{&self.rows_, &self.pos_, &self.x_, &self.xn_, &self.q_, &self.k_, &self.v_,
                          &self.attn_, &self.gate_, &self.up_, &self.h1_, &self.h2_};
    }

    const QwenVisionEncoder& enc_;
    const QwenVisionConfig& cfg_;
    int device_ = 0;
    size_t weight_bytes_ = 0;

    CudaMatrix patch_w_, mm0_, mm2_;
    CudaDeviceBuffer post_w_, post_b_, mm0_b_, mm2_b_;
    std::vector<Layer> layers_;

    std::unique_ptr<CudaStream> stream_;
    CudaStaging staging_;  // the pair's pixel rows and positions through pinned memory
    int64_t capacity_ = 0;   // tokens the activations hold
    // Activations of one pair (N tokens, W = width, F = n_ff, U = merge^2):
    CudaDeviceBuffer rows_;               // [N, 3 * temporal * patch^2] pixel rows, window-major unit order
    CudaDeviceBuffer pos_;                // int32 [2, N]: patch row, patch column
    CudaDeviceBuffer x_, xn_, q_, k_, v_, attn_;  // [N, W]
    CudaDeviceBuffer gate_, up_;          // [N, F]
    CudaDeviceBuffer h1_, h2_;            // [N / U, U * W], [N / U, n_embd]
    // The current frame size's layout.
    int hp_ = -1, wp_ = -1;
    std::vector<int32_t> unit_order_;     // slot -> raster merge unit
    std::vector<int64_t> window_start_, window_len_;  // token ranges of the windows (one: the pair)
    std::vector<int32_t> pos_host_;       // [2, N] in slot order
    CudaSegmentTable segments_;           // [1 + n_windows] segments over k_ / v_ (f32)
    std::vector<float> rows_host_, h2_host_;  // [N, K] slot-ordered rows; [N / U, n_embd] merger output
    std::vector<float> pair_host_;        // [temporal, 3, H, W]
};

}  // namespace x2l
