// The decoder LLM on a CUDA device, built from the kernels of cuda/backend.h:
//   CudaLlm     - the weights, uploaded once (owned by the session's CUDA executor);
//   CudaContext - one f16 KV cache plus activations on that device, with an optional prefix of
//                 borrowed KV segments that every query attends to first (the X²L mixed cache and the
//                 prefill's levels build theirs: cuda/mixed_cache.h, cuda/prefill.h);
//                 single-token forwards replay one captured CUDA graph.
// The token embedding stays on the host: callers look rows up there and pass embeddings.
//
// Compiled only when the build has the CUDA backend; backends.cpp is the only code above cpp/cuda/ that
// names it.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cuda/backend.h"
#include "llm/executor.h"
#include "llm/model.h"

namespace x2l {

// A weight matrix in device memory, in the layout cuda_matmul reads (shared by the LLM and the vision tower).
struct CudaMatrix {
    CudaDeviceBuffer buf;
    DType type = DType::F32;
    int64_t n_in = 0, n_out = 0;
};
// Uploads w (Error naming `name` when the kernels cannot read its type or layout); adds its bytes to total.
CudaMatrix cuda_upload_weight(const Weight& w, const std::string& name, size_t& total);
// Uploads an f32 vector (an empty buffer for an empty vector); adds its bytes to total.
CudaDeviceBuffer cuda_upload_floats(const std::vector<float>& v, size_t& total);
// y [n, w.n_out] = x [n, w.n_in] · w^T (+ bias [w.n_out] when it is not empty), enqueued on stream.
void cuda_linear(const CudaMatrix& w, const float* x, int64_t n, float* y, const CudaDeviceBuffer& bias, void* stream,
                 MatmulKernel kernel = MatmulKernel::Auto);

class CudaLlm {
  public:
    // Uploads every weight of `model` to device `device`. Throws Error for layouts the kernels do not
    // read (the message names the tensor), BudgetError when device memory runs out.
    CudaLlm(const LlmModel& model, int device);
    CudaLlm(const CudaLlm&) = delete;
    CudaLlm& operator=(const CudaLlm&) = delete;

    using Matrix = CudaMatrix;
    struct Layer {
        CudaDeviceBuffer attn_norm, ffn_norm, bq, bk, bv;  // f32; biases empty when absent
        Matrix wq, wk, wv, wo, w_gate, w_up, w_down;
        // Beacon (Video-XL) models: the VST rows' own projections (empty otherwise).
        Matrix vst_q, vst_k, vst_v;
        CudaDeviceBuffer vst_bq, vst_bk, vst_bv;
    };
    const LlmConfig& config() const { return cfg_; }
    int device() const { return device_; }
    const std::string& device_name() const { return name_; }
    bool integrated() const { return integrated_; }
    size_t weight_bytes() const { return weight_bytes_; }
    bool has_beacon() const { return has_beacon_; }
    const std::vector<Layer>& layers() const { return layers_; }
    const Matrix& output() const { return output_; }
    const CudaDeviceBuffer& output_norm() const { return output_norm_; }
    // M-RoPE models (config().n_pos_axes > 1): every pair's frequency and position axis (LlmModel's).
    const RopeAxes& rope_axes() const { return mrope_; }

  private:
    LlmConfig cfg_;
    RopeAxes mrope_;
    int device_ = 0;
    std::string name_;
    bool integrated_ = false;
    bool has_beacon_ = false;
    size_t weight_bytes_ = 0;
    std::vector<Layer> layers_;
    Matrix output_;
    CudaDeviceBuffer output_norm_;
};

// Callbacks around each layer's attention in CudaContext::forward (the reload and the streamed
// prefill prefix use them to order the compute stream against their copies).
struct CudaPrefixHooks {
    // Before layer `layer`'s attention is enqueued on `stream`. May re-point the prefix segments of
    // that layer (`segments`: the prefix, then the cache's own entries, which it must leave alone).
    std::function<void(int layer, void* stream, std::vector<CudaKVSegment>& segments)> before;
    // After that attention (and the votes that read the prefix) were enqueued.
    std::function<void(int layer, void* stream)> after;
};

class CudaContext {
  public:
    // row_major=false: a context for forward_layer_major() only (the X²L prefill), without the buffers
    // that only forward() and decoding use: [n_batch, n_vocab] logits (~0.3 GB at n_batch 512 for a 152k
    // vocabulary) and the [n_batch, n_embd] hidden states; forward() then throws.
    CudaContext(const CudaLlm& llm, int64_t n_ctx, int64_t n_batch, bool row_major = true);
    CudaContext(const CudaContext&) = delete;
    CudaContext& operator=(const CudaContext&) = delete;

    // Segments before the cache's own entries, per layer (device-accessible, the same entries in
    // every layer). hooks run around every layer's attention (the reload makes the stream wait for that
    // layer's copy there). Clears the own entries.
    void set_prefix(std::vector<std::vector<CudaKVSegment>> per_layer, CudaPrefixHooks hooks = {});

    // Runs n input embeddings x [n, n_embd] (host) at positions pos [n_pos_axes, n] (host) in n_batch pieces,
    // appending their K/V; logits of the last n_logits rows go to logits [n_logits, n_vocab] (host). On
    // failure the cache is left as it was before the call. vst (host, [n] or nullptr): rows flagged 1
    // are beacon (VST) rows, whose q/k/v come from the layer's VST projections (a beacon model only).
    void forward(const float* x, int64_t n, const int32_t* pos, int64_t n_logits, float* logits,
                 const uint8_t* vst = nullptr);
    // forward() in layer-major order, for the X²L prefill (no logits): every layer runs over all n rows
    // (n_batch at a time) before the next starts, so the hooks run once per layer (before the first
    // piece's attention, after the last's) and a prefix streamed per layer is copied once per call,
    // not once per n_batch rows. Holds the n rows' hidden states [n, n_embd] on the device.
    void forward_layer_major(const float* x, int64_t n, const int32_t* pos, const uint8_t* vst = nullptr);  // pos [n_pos_axes, n]
    int64_t n_past() const { return n_past_; }
    int64_t n_ctx() const { return n_ctx_; }
    void truncate(int64_t n);  // keep the first n own entries

    // Attention observation for later forward() calls (X²L compression, cuda_attention_votes): every
    // layer adds the softmax probabilities that queries at own index >= obs_start give to the own
    // entries into votes[layer][kv_head][entry] (device, n_layer * n_head_kv * votes_stride floats,
    // votes_stride >= the own entries), or with max_pool keeps the largest. nullptr turns it off.
    void set_observer(float* votes, int64_t votes_stride, int64_t obs_start, bool max_pool = false);
    // Query capture for later forward() calls (the X²L scorers' question pass): every layer copies the
    // pre-RoPE queries of own rows < rows into dst [n_layer, rows, n_head * head_dim] (device f32).
    // nullptr turns it off.
    void set_query_capture(float* dst, int64_t rows);
    // The own entries' K or V rows of one layer: [n_ctx, n_head_kv, head_dim] f16, token-major.
    const CudaDeviceBuffer& k_cache(int layer) const { return k_[layer]; }
    const CudaDeviceBuffer& v_cache(int layer) const { return v_[layer]; }

    // Single-token forwards as one CUDA graph (decode is launch-bound without: 17 to 21 launches per
    // layer per token): captured on the first such forward after set_prefix(), then replayed with the
    // token's embedding, position and cache row passed through pinned memory. Not while the forward
    // has hooks, an observer, a query capture or beacon rows (those run as before). On by default; a
    // capture the driver refuses turns it off for this context (graph_stats().note says why).
    void set_graphs(bool on);
    const GraphStats& graph_stats() const { return graph_stats_; }
    // Forget the hooks (CudaMixedCache: its reload has landed, nothing is left to wait for).
    void drop_hooks() { hooks_ = CudaPrefixHooks(); }
    // Polled between the layers of forward_layer_major() (cuda/layer_gate.h; a cancel throws Cancelled
    // and the call appends nothing). forward() is checked between its n_batch pieces by its caller.
    void set_interrupt(const Interrupt* interrupt) { interrupt_ = interrupt; }

    size_t kv_bytes() const;      // own entries in use
    size_t device_bytes() const;  // everything this object holds on the device
    void* stream() const { return stream_->handle(); }

  private:
    void forward_batch(const float* x_host, int64_t n, const int32_t* pos_host, int64_t n_logits, float* logits,
                       const uint8_t* vst);
    // check_layers: poll interrupt_ between layers (the layer-major prefill; a decode step would only
    // pay for the host waits).
    void run_rows(const float* x_host, int64_t n, const int32_t* pos_host, const uint8_t* vst, CudaDeviceBuffer& x_buf,
                  CudaDeviceBuffer& pos_buf, bool check_layers);
    // Layer l over m rows appended at own index `first`: x [m, n_embd] (device) in place; pos (device)
    // [n_pos_axes rows pos_axis_stride apart, m] (stride 0: one row for every axis) and vst_ids [n_vst]. The hooks run when first_rows (before) / last_rows (after) of the layer.
    // step (device int32 {pos, row, own entries after it}, graph capture only): m = 1 and what changes
    // per token is read from there (the tables were assigned before the capture, no hooks).
    void layer_rows(int l, float* x, int64_t first, int64_t m, const int32_t* pos, int64_t pos_axis_stride, int64_t n_vst,
                    const int32_t* vst_ids,
                    bool first_rows, bool last_rows, const int32_t* step = nullptr);
    bool graph_eligible(const uint8_t* vst) const;
    CudaKVSegment own_segment(int l, int64_t n_tokens) const;  // layer l's own entries [0, n_tokens) as a segment
    void decode_step(const float* x_host, int32_t pos, int64_t n_logits, float* logits);  // one token through the graph
    void check_rows(int64_t end) const;  // the observer and the query capture hold own rows [0, end)
    // Appends the indices of the flagged rows among vst[0, m) to ids; returns how many.
    int64_t vst_rows(const uint8_t* vst, int64_t m, std::vector<int32_t>& ids);
    // The VST rows' q/k/v over the ordinary ones (after the projections, before RoPE), as the CPU's beacon_qkv.
    void beacon_qkv(const CudaLlm::Layer& L, int64_t n_vst, const int32_t* ids, float* q, float* k, float* v);
    void matmul(const CudaLlm::Matrix& w, const float* x, int64_t n, float* y, const CudaDeviceBuffer& bias);

    const CudaLlm& llm_;
    int64_t n_ctx_ = 0, n_batch_ = 0, n_past_ = 0;
    std::vector<CudaDeviceBuffer> k_, v_;  // per layer [n_ctx, n_head_kv, head_dim] f16, token-major
    CudaDeviceBuffer x_, xn_, q_, k_new_, v_new_, attn_, gate_, up_, pos_, logits_, attn_ws_, lse_;
    // Beacon models: the batch's VST row indices [n_batch] (int32), their normed inputs [n_batch, n_embd]
    // and projections [n_batch, q or kv dim] (empty otherwise).
    CudaDeviceBuffer vst_ids_, vst_x_, vst_q_, vst_k_, vst_v_;
    CudaStaging staging_;  // the rows, positions and VST ids of run_rows() go through pinned memory
    CudaDeviceBuffer x_all_, pos_all_;  // forward_layer_major: [n, n_embd] hidden states, [n_pos_axes, n] positions
    float* votes_ = nullptr;
    int64_t votes_stride_ = 0, obs_start_ = 0;
    bool votes_max_ = false;
    float* q_capture_ = nullptr;
    int64_t q_capture_rows_ = 0;
    std::vector<std::vector<CudaKVSegment>> segments_;  // [layer][segment]: the prefix, then the own entries
    CudaPrefixHooks hooks_;
    const Interrupt* interrupt_ = nullptr;
    std::vector<CudaSegmentTable> tables_;  // per layer: prefix + own entries
    bool graphs_ = true;
    std::unique_ptr<CudaGraph> graph_;
    bool graph_logits_ = false;                   // the captured graph computes logits
    std::vector<const void*> graph_tables_;       // the tables' device addresses it reads
    std::unique_ptr<CudaHostBuffer> step_host_;   // [n_embd] f32 embedding, then int32 {pos, row, own}
    std::unique_ptr<CudaHostBuffer> logits_host_; // [n_vocab] f32
    CudaDeviceBuffer step_;                       // int32 {pos, row, own}
    GraphStats graph_stats_;
    std::unique_ptr<CudaStream> stream_;    // created after the device is selected
};

}  // namespace x2l
