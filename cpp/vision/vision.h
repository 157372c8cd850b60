// Vision towers of the supported video LLMs, run on the CPU over GGUF weights (docs/gguf_layout.md):
//   siglip (LLaVA-OneVision): conv patch embedding with bias + position embeddings, no CLS, no pre-LN,
//                              gelu_tanh MLP; projector; bilinear 2x down-sampling after the projector.
//   clip   (Video-XL):         conv without bias, CLS token, position embeddings, pre-LN, quick_gelu MLP;
//                              CLS dropped; projector; 2x2 average pooling after the projector.
//   idefics3 (SmolVLM2, Idefics3; llama.cpp's clip.projector_type idefics3, docs/families.md §5): the
//                              siglip tower with every block and the post-LN applied, then the
//                              pixel-shuffle connector (s x s patches -> one token) and a bias-free Linear.
//   internvl (InternVL 2.5 / 3; llama.cpp's clip.projector_type internvl, docs/families.md §6): InternViT,
//                              conv with bias, CLS token first, position embeddings, no pre-LN, blocks
//                              with layer scales (ls1/ls2), optional q/k RMSNorm and RMSNorm blocks (the
//                              6B tower), GELU (erf) MLP; CLS dropped; pixel shuffle, then LayerNorm ->
//                              Linear -> GELU -> Linear.
// Features are the hidden state after layer `select_layer` (HF hidden_states indexing); the
// post-LN is applied only by idefics3. Frames are independent, so they are encoded a few at a time and the
// activation memory does not grow with the number of frames.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/gguf.h"
#include "core/interrupt.h"
#include "core/threadpool.h"
#include "cpu/ops.h"

namespace x2l {

enum class VisionKind { Siglip, Clip, InternViT };
enum class VisionAct { GeluTanh, QuickGelu, GeluErf };
enum class PoolMode { None, Bilinear, Avg };
// mlp: LLaVA's Linear-GELU-Linear on every feature row; pixel_shuffle: Idefics3's connector (shuffle +
// bias-free Linear); shuffle_mlp: InternVL's (shuffle, then LayerNorm -> Linear -> GELU -> Linear).
enum class ProjectorKind { Mlp, PixelShuffle, ShuffleMlp };

struct VisionConfig {
    VisionKind kind = VisionKind::Siglip;
    VisionAct act = VisionAct::GeluTanh;
    int image_size = 0;     // input side in pixels (square)
    int patch_size = 0;
    int grid = 0;           // floor(image_size / patch_size) patches per side
    int n_patches = 0;      // grid * grid
    int n_tokens = 0;       // tokens the encoder runs on: n_patches (+1 with CLS)
    int width = 0;          // encoder hidden size
    int n_ff = 0;           // encoder MLP size
    int n_head = 0;
    int head_dim = 0;
    int n_layer_stored = 0; // clip.vision.block_count
    int select_layer = -1;  // as stored (HF hidden_states index; negative counts from the end)
    int n_layer_run = 0;    // layers actually run: hidden_states[select] is the output of layer n_layer_run-1
    float eps = 1e-6f;
    bool has_cls = false;
    bool drop_cls = false;
    int n_feat = 0;         // feature rows per frame fed to the projector (n_tokens, minus CLS if dropped)
    int feat_grid = 0;      // side of the square grid the features form (pooling needs it)
    int n_embd = 0;         // projector output width (= LLM width)
    PoolMode pool = PoolMode::None;
    int pool_stride = 2;
    int pool_grid = 0;      // side of the pooled grid
    int tokens_per_frame = 0;
    ProjectorKind projector = ProjectorKind::Mlp;
    bool post_norm = false; // v.post_ln applied to the last block's output (idefics3)
    bool pre_norm = false;  // v.pre_ln applied to the embeddings (CLIP)
    bool rms_norm = false;  // blocks normalise with RMSNorm (InternViT-6B: no ln biases) instead of LayerNorm
    bool layer_scale = false;  // x += ls1 * attn(...), x += ls2 * mlp(...) (InternViT)
    bool qk_norm = false;   // RMSNorm of q and k over the whole width before the heads split (InternViT-6B)
    int shuffle = 1;        // pixel-shuffle scale s: s x s feature rows become one token of s*s*width
    std::vector<float> image_mean, image_std;  // [3] each, for the caller's preprocessing
    std::string resize;      // x2l.image.resize
    std::string resample;    // x2l.image.resample
    std::string newline;     // x2l.video.newline: "none" | "end"
};

struct VisionLayer {
    std::vector<float> ln1_w, ln1_b, ln2_w, ln2_b;  // [width]
    Weight wq, wk, wv, wo;                          // [width -> width]
    std::vector<float> bq, bk, bv, bo;              // [width]
    Weight w_up, w_down;                            // fc1 [width -> n_ff], fc2 [n_ff -> width]
    std::vector<float> b_up, b_down;                // [n_ff], [width]
    std::vector<float> ls1, ls2;                    // [width] layer scales, empty without
    std::vector<float> q_norm, k_norm;              // [width] RMSNorm weights, empty without
};

class VisionEncoder {
  public:
    // How far encode() goes; used by tests to compare intermediate results with the reference.
    enum class Stage {
        Features,   // selected hidden state (CLS dropped when drop_cls; post-LN'd for idefics3): [n_frames * n_feat, width]
        Projected,  // projector output before pooling: [n_frames * n_feat, n_embd] (pixel shuffle,
                    // idefics3 and internvl: [n_frames * tokens_per_frame, n_embd], the same as Pooled)
        Pooled,     // final tokens: [n_frames * tokens_per_frame, n_embd]
    };

    // Throws FormatError("model has no vision encoder") for a text-only file, and FormatError naming
    // the key or tensor for anything missing or malformed. Reads x2l-edge's files (x2l.vision.*,
    // projector mlp) and llama.cpp's idefics3, internvl and legacy LLaVA-1.5 mmproj files. Weights point into f's mapping: f must
    // outlive the encoder.
    static std::unique_ptr<VisionEncoder> load(const GGUFFile& f);

    const VisionConfig& config() const { return cfg_; }
    int tokens_per_frame() const { return cfg_.tokens_per_frame; }
    int n_embd_out() const { return cfg_.n_embd; }
    // mm.image_newline [n_embd], empty when the model has none (the caller places it).
    const std::vector<float>& image_newline() const { return newline_; }
    size_t weight_bytes() const { return weight_bytes_; }

    // Frames encoded per internal batch (>= 1). The default keeps about kBatchTokens tokens per batch.
    int batch_frames() const { return batch_frames_; }
    void set_batch_frames(int n);

    // Output rows per frame and columns for a stage.
    int64_t rows_per_frame(Stage s) const;
    int64_t cols(Stage s) const;

    // pixels: [n_frames, 3, image_size, image_size] float32, already resized and normalised.
    // out: [n_frames * rows_per_frame(stage), cols(stage)], frame-major, row-major grid inside a frame.
    // All scratch is local to the call, so concurrent calls are safe as long as each uses its own
    // pool (a ThreadPool runs one parallel region at a time). interrupt (may be null) is checked before
    // every batch, every layer and the projector: a cancel stops the call (Cancelled) within one layer
    // of one batch; out is then partly written.
    void encode(ThreadPool& pool, const float* pixels, int64_t n_frames, float* out,
                Stage stage = Stage::Pooled, const Interrupt* interrupt = nullptr) const;

    // Row r (frame r / n_patches, patch r % n_patches in row-major grid order) of the im2col matrix
    // [n * n_patches, 3*p*p] of pixels [n, 3, S, S], in the conv weight's (channel, ky, kx) order.
    void im2col_row(const float* pixels, int64_t r, float* dst) const;

    static constexpr int kBatchTokens = 1024;

  private:
    friend class CudaVision;  // reads the weights and pooling settings to upload them
    VisionEncoder() = default;
    struct Scratch;
    // Runs the tower on n frames; leaves the selected features in s.x [n * n_tokens, width].
    void run_tower(ThreadPool& pool, Scratch& s, const float* pixels, int64_t n, const Interrupt* interrupt) const;
    void attention(ThreadPool& pool, Scratch& s, int64_t n) const;
    // One frame's [g, g] grid -> [pg, pg] grid, channels [0, c) of rows that are `stride` floats apart.
    void pool_frame(const float* in, float* out, int64_t stride, int64_t c) const;
    // Idefics3's / InternVL's settings (clip.* keys only) in place of the x2l.vision.* / x2l.pool.* ones.
    static void configure_idefics3(const GGUFFile& f, VisionConfig& c);
    // llama.cpp's legacy LLaVA mmproj (clip.* keys only): the MLP activation and the select_layer.
    static std::string llava_act(const GGUFFile& f);
    static int64_t llava_select(const GGUFFile& f, const VisionConfig& c);
    static void configure_internvl(const GGUFFile& f, VisionConfig& c);
    // The pixel-shuffle scale (clip.vision.projector.scale_factor) and the token grid it gives.
    static void configure_shuffle(const GGUFFile& f, VisionConfig& c, const char* family);
    // InternViT's optional per-layer tensors (layer scales, q/k norms, biases), present in every layer or none.
    void load_internvit_layer(const GGUFFile& f, int l, size_t& total);
    bool shuffles() const { return cfg_.projector != ProjectorKind::Mlp; }

    VisionConfig cfg_;
    Weight patch_w_;                 // [3*p*p -> width] (conv as a matmul over im2col rows)
    std::vector<float> patch_b_;     // [width] (SigLIP) or empty
    std::vector<float> class_embd_;  // [width] (CLIP) or empty
    std::vector<float> pos_embd_;    // [n_tokens, width]
    std::vector<float> pre_ln_w_, pre_ln_b_;  // [width] (CLIP) or empty
    std::vector<VisionLayer> layers_;         // the n_layer_run layers that are used
    Weight mm0_, mm2_;                        // projector (mlp)
    std::vector<float> mm0_b_, mm2_b_;
    std::vector<float> post_ln_w_, post_ln_b_;  // [width] (idefics3)
    Weight mm_fc_;                              // [s*s*width -> n_embd], no bias (idefics3)
    std::vector<float> mm_ln_w_, mm_ln_b_;      // [s*s*width] projector LayerNorm (internvl; mm0_/mm2_ follow)
    std::vector<float> newline_;
    // Bilinear taps along one axis, shared by rows and columns (the grid is square).
    std::vector<int> bl_i0_, bl_i1_;
    std::vector<float> bl_l0_, bl_l1_;
    int batch_frames_ = 1;
    size_t weight_bytes_ = 0;
};

}  // namespace x2l
