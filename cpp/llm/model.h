// Decoder-only LLM (llama, qwen2 and qwen2vl architectures) over GGUF weights: GQA, RMSNorm, SwiGLU,
// RoPE (NORM for llama, NEOX for qwen2, M-RoPE for qwen2vl), optional q/k/v biases, tied or separate output.
// Weights are read in place from the memory-mapped file.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/gguf.h"
#include "core/interrupt.h"
#include "cpu/attention.h"
#include "cpu/kv_cache.h"
#include "cpu/mrope.h"
#include "cpu/ops.h"

namespace x2l {

struct LlmConfig {
    std::string arch;
    int n_vocab = 0;
    int n_ctx_train = 0;
    int n_embd = 0;
    int n_layer = 0;
    int n_head = 0;
    int n_head_kv = 0;
    int head_dim = 0;
    int n_ff = 0;
    int rope_dim = 0;
    float rms_eps = 1e-6f;
    float rope_base = 10000.0f;
    RopeType rope_type = RopeType::Norm;
    bool tied_output = false;
    // Rows of a forward's positions: 1, or 3 for M-RoPE (qwen2vl: temporal, height, width per token;
    // rope_sections = rope.dimension_sections, pairs per axis).
    int n_pos_axes = 1;
    int rope_sections[3] = {0, 0, 0};
};

struct LlmLayer {
    std::vector<float> attn_norm, ffn_norm;  // [n_embd]
    Weight wq, wk, wv, wo;                   // wq: [n_embd -> n_head*head_dim] ...
    std::vector<float> bq, bk, bv;           // empty when the model has no qkv bias
    Weight w_gate, w_up, w_down;
    // Video-XL beacon (VST) projections: used instead of wq/wk/wv for summarization-token rows.
    Weight vst_q, vst_k, vst_v;
    std::vector<float> vst_bq, vst_bk, vst_bv;
};

// Optional instrumentation of a forward pass (the X²L scorers' question pass and the CPU reload use it).
struct ForwardHooks {
    // Per layer, before RoPE: q [n, n_head*head_dim] and k [n, n_head_kv*head_dim] of the batch.
    std::function<void(int layer, const float* q, const float* k, int64_t n)> on_qk;
    // Called before layer `layer` reads the cache (the reload engine blocks here until that layer's
    // rows have arrived).
    std::function<void(int layer)> before_attention;
};

// What the X²L prefill asks of a forward besides its rows.
struct PrefillHooks {
    // snapkv, kvzip: for batch queries t in [votes.from, votes.to), the softmax probabilities over cache
    // entries [votes.begin, votes.end) summed (votes.max: their maximum) over the query heads of each KV head into
    // votes.out[layer][kv_head][entry - begin] (a buffer of n_layer * n_head_kv * (end - begin)).
    AttentionObserver votes;
    // beacon: rows (of the batch) that are Video-XL summarisation tokens, whose q/k/v come from the VST
    // projections.
    const uint8_t* vst_rows = nullptr;
};

// Scratch activations for one forward call; grows on demand and is reused across calls.
struct Workspace {
    aligned_vector<float> x, xn, q, k, v, attn, gate, up;  // [n_tokens, *]
    AttentionScratch attention;
    aligned_vector<uint8_t> act;                            // matmul activation scratch
    aligned_vector<float> vx, vq, vk, vv;                   // beacon rows: inputs and projections
    std::vector<float> rope_cos, rope_sin;                  // M-RoPE: [n_tokens, head_dim / 2]
    size_t bytes() const;
};

class LlmModel {
  public:
    // Validates hyper-parameters, tensor presence, shapes and types; throws FormatError.
    static std::unique_ptr<LlmModel> load(const GGUFFile& f);

    const LlmConfig& config() const { return cfg_; }
    size_t weight_bytes() const { return weight_bytes_; }
    // Identity of the weights (saved X²L indexes record it): XXH64 over the hyper-parameters, every
    // tensor's name, type and shape, and 16 evenly spaced 1 KiB windows of its bytes (all of them
    // below 16 KiB). Two models with the same dimensions but different weights differ.
    uint64_t fingerprint() const { return fingerprint_; }

    // Input embeddings of tokens: out [n, n_embd]. Throws Error on an out-of-range id.
    void embed(const int32_t* tokens, int64_t n, float* out) const;

    // Runs n tokens given by their input embeddings x [n, n_embd] (overwritten) at positions
    // pos [n_pos_axes, n] (M-RoPE: rows t, h, w), appending their K/V to the cache tail (an entry records
    // its first-axis position: a move by d shifts every axis by d, which M-RoPE rotates like plain RoPE). Token i attends to every cache entry before it (all
    // prefix/earlier entries plus the batch's tokens <= i). logits: [n_logits, n_vocab] for the last
    // n_logits tokens of the batch (0 = none). interrupt is checked before every layer; on any throw
    // the cache tail is as before the call.
    void forward(ThreadPool& pool, Workspace& ws, float* x, int64_t n, const int32_t* pos, KVCache& cache,
                 int64_t n_logits, float* logits, const ForwardHooks* hooks = nullptr,
                 const PrefillHooks* prefill = nullptr, const Interrupt* interrupt = nullptr) const;

    // Final norm + output projection of hidden rows x [n, n_embd] -> logits [n, n_vocab].
    void logits(ThreadPool& pool, Workspace& ws, const float* x, int64_t n, float* out) const;
    const Weight& token_embedding() const { return tok_embd_; }
    // Read access for other backends (the CUDA LLM uploads these).
    const std::vector<LlmLayer>& layers() const { return layers_; }
    const Weight& output_weight() const { return output_; }
    const std::vector<float>& output_norm() const { return output_norm_; }
    bool has_beacon() const { return !vst_embd_.empty(); }
    const std::vector<float>& vst_embedding() const { return vst_embd_; }  // [n_embd]
    const float* inv_freq() const { return inv_freq_.data(); }
    RopeSpec rope_spec() const { return RopeSpec{inv_freq(), config().rope_dim, config().rope_type}; }
    // M-RoPE (n_pos_axes > 1): frequency and position axis of every pair (empty otherwise).
    const RopeAxes& rope_axes() const { return mrope_; }

  private:
    // Recomputes q/k/v of the beacon rows with the VST projections (same normalised input).
    void beacon_qkv(ThreadPool& pool, Workspace& ws, const LlmLayer& L, int64_t n, const uint8_t* vst) const;

    LlmConfig cfg_;
    Weight tok_embd_, output_;
    std::vector<float> output_norm_;
    std::vector<LlmLayer> layers_;
    std::vector<float> inv_freq_;  // [rope_dim / 2]
    RopeAxes mrope_;               // qwen2vl: frequency and axis of every pair
    std::vector<float> vst_embd_;  // [n_embd], empty without beacon weights
    size_t weight_bytes_ = 0;
    uint64_t fingerprint_ = 0;
};

}  // namespace x2l
