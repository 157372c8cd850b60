// The vision tower + projector + pooling of a VisionEncoder on a CUDA device (the same forward as
// cpp/vision/vision.cpp, built from the kernels of cuda/backend.h). Pixels come from the host and the result
// goes back to the host; everything in between stays on the device:
//   im2col (host) -> patch matmul -> [CLS] + positions [-> pre-LN] -> n_layer_run pre-LN blocks
//   (per-frame bidirectional attention over f32 K/V) [-> post-LN] -> [drop CLS] -> projector -> pooling,
//   the projector being LLaVA's MLP, Idefics3's pixel shuffle + bias-free Linear, or InternVL's pixel shuffle +
//   LayerNorm -> Linear -> GELU -> Linear (InternViT blocks: layer scales, optional RMSNorm and q/k norm).
// Frames are encoded batch_frames at a time; the activation buffers are sized for one batch.
//
// The vision tower's CUDA executor (vision/executor.h); backends.cpp makes it.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/llm.h"
#include "cuda/vision_block.h"
#include "vision/executor.h"
#include "vision/vision.h"

namespace x2l {

class CudaVision final : public VisionExecutor {
  public:
    // Uploads the encoder's weights to `device`. Throws Error for layouts the kernels do not read (the
    // message names the tensor), BudgetError when device memory runs out. `enc` must outlive this.
    // batch_frames 0 chooses about kBatchTokens tokens per batch.
    CudaVision(const VisionEncoder& enc, int device, int batch_frames = 0);
    CudaVision(const CudaVision&) = delete;
    CudaVision& operator=(const CudaVision&) = delete;

    // Same contract as VisionEncoder::encode: pixels [n_frames, 3, S, S] (host) -> out (host)
    // [n_frames * rows_per_frame(stage), cols(stage)]. One call at a time. interrupt: checked before
    // every batch and between layers (cuda/layer_gate.h).
    void encode(const float* pixels, int64_t n_frames, float* out, VisionEncoder::Stage stage,
                const Interrupt* interrupt) override;

    std::string device() const override { return "cuda:" + std::to_string(device_); }
    int batch_frames() const override { return batch_; }
    void set_batch_frames(int n) override;  // reallocates the activation buffers
    size_t weight_bytes() const { return weight_bytes_; }
    size_t device_bytes() const override;  // weights + activations

    static constexpr int kBatchTokens = 4096;

  private:
    struct Layer : CudaVisionBlock {
        CudaDeviceBuffer ls1, ls2, q_norm, k_norm;  // InternViT: [width] each, empty without
    };
    void allocate(int batch);
    void encode_batches(const float* pixels, int64_t n_frames, float* out, VisionEncoder::Stage stage,
                        const Interrupt* interrupt);
    // Every activation buffer (const or not with self), to release them together and to count them.
    template <class Self>
    static auto activations(Self& self) {
        return std::array{&self.patches_, &self.x_, &self.xn_, &self.q_, &self.k_, &self.v_,
                          &self.attn_, &self.ff_, &self.feat_, &self.h1_, &self.h2_, &self.pooled_,
                          &self.shuffled_};
    }
    // Leaves the selected hidden state in x_ [n * n_tokens, width]; interrupt polled between layers.
    void run_tower(int64_t n, const Interrupt* interrupt);
    // The blocks' norm: RMSNorm (InternViT-6B) or LayerNorm, rows of width floats.
    void block_norm(const CudaDeviceBuffer& w, const CudaDeviceBuffer& b, const float* x, float* y, int64_t rows);
    // x += y, or x += scale * y with a layer scale [width] (y is overwritten).
    void residual(float* x, float* y, const CudaDeviceBuffer& scale, int64_t rows);

    const VisionEncoder& enc_;
    const VisionConfig& cfg_;
    int device_ = 0;
    int batch_ = 0;
    size_t weight_bytes_ = 0;

    CudaMatrix patch_w_;
    CudaDeviceBuffer patch_b_, class_embd_, pos_embd_, pre_ln_w_, pre_ln_b_;
    std::vector<Layer> layers_;
    CudaMatrix mm0_, mm2_;
    CudaDeviceBuffer mm0_b_, mm2_b_;
    CudaDeviceBuffer post_ln_w_, post_ln_b_;  // idefics3: [width]
    CudaMatrix mm_fc_;                        // idefics3: [s*s*width -> n_embd], no bias
    CudaDeviceBuffer mm_ln_w_, mm_ln_b_;      // internvl: [s*s*width] projector LayerNorm

    std::unique_ptr<CudaStream> stream_;
    std::vector<float> patches_host_;  // [batch * n_patches, 3*p*p] im2col rows
    // Activations for one batch (n = batch frames, T = n_tokens, W = width):
    CudaDeviceBuffer patches_;         // [n * n_patches, 3*p*p]
    CudaStaging staging_;              // patches_host_ -> patches_ through pinned memory (no implicit sync)
    CudaDeviceBuffer x_, xn_;          // [n * T, W] residual stream, normed input / sub-layer output
    CudaDeviceBuffer q_, k_, v_, attn_;  // [n * T, W]
    CudaDeviceBuffer ff_;              // [n * T, n_ff]
    CudaDeviceBuffer feat_;            // [n * n_feat, W] (CLS dropped), when n_feat != T
    CudaDeviceBuffer h1_, h2_, pooled_;  // [n * n_feat, n_embd] x 2, [n * tokens_per_frame, n_embd]
    CudaDeviceBuffer shuffled_;          // pixel shuffle: [n * tokens_per_frame, s*s*W]
    CudaSegmentTable frame_kv_;  // per frame of a batch, one segment: its K/V rows (f32)
};

}  // namespace x2l
