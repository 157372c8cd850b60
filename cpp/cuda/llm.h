// The decoder LLM on a CUDA device, built from the kernels of cuda_backend.h:
//   CudaLlm     - the weights, uploaded once (owned by LlmSession when it was opened with a device);
//   CudaContext - one f16 KV cache plus activations on that device, with an optional prefix of
//                 borrowed KV segments that every query attends to first (the X²L mixed cache);
//                 single-token forwards replay one captured CUDA graph;
//   CudaX2L     - one video index on the device (Video-X²L's tiers): sink and H-KVs resident in device
//                 memory, L-KVs in pinned host memory, and per question the selected chunks' L-KVs
//                 copied layer by layer on a copy stream while the question's prefill runs (each
//                 layer waits on its own event), then decoding on sink + [L or H per chunk] + tail
//                 (beacon indexes: keys of chunks whose dense positions moved re-rotated on the way);
//   CudaPrefill - the forward passes of the X²L bi-level prefill (both compressors).
// The token embedding stays on the host: callers look rows up there and pass embeddings.
//
// Defined only when the build has the CUDA backend (X2L_HAVE_CUDA=1).
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <utility>
#include <memory>
#include <string>
#include <vector>

#include "cuda/backend.h"
#include "x2l/kv_store.h"
#include "llm/model.h"
#include "x2l/reload.h"

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

  private:
    LlmConfig cfg_;
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
    // every layer); the own entries then sit at positions pos0 + i. hooks run around every layer's
    // attention (the reload makes the stream wait for that layer's copy there). Clears the own entries.
    void set_prefix(std::vector<std::vector<CudaKVSegment>> per_layer, int32_t pos0, CudaPrefixHooks hooks = {});

    // Runs n input embeddings x [n, n_embd] (host) in n_batch pieces, appending their K/V; logits
    // of the last n_logits rows go to logits [n_logits, n_vocab] (host). On failure the cache is left
    // as it was before the call. vst (host, [n] or nullptr): rows flagged 1 are beacon (VST) rows, whose
    // q/k/v come from the layer's VST projections (a beacon model only).
    void forward(const float* x, int64_t n, int64_t n_logits, float* logits, const uint8_t* vst = nullptr);
    // forward() in layer-major order, for the X²L prefill (no logits): every layer runs over all n rows
    // (n_batch at a time) before the next starts, so the hooks run once per layer (before the first
    // piece's attention, after the last's) and a prefix streamed per layer is copied once per call,
    // not once per n_batch rows. Holds the n rows' hidden states [n, n_embd] on the device.
    void forward_layer_major(const float* x, int64_t n, const uint8_t* vst = nullptr);
    // The eval contract of LlmSession and X2LDecoder on top of forward(): the last row's logits into
    // last_logits [n_vocab]; with all_out, every row's into all_out [n, n_vocab].
    void eval(const float* x, int64_t n, std::vector<float>& last_logits, std::vector<float>* all_out);
    // The same for token ids: their rows of `model`'s embedding (on the host) through eval().
    void eval_tokens(const LlmModel& model, const std::vector<int32_t>& tokens, std::vector<float>& last_logits,
                     std::vector<float>* all_out);
    int64_t n_past() const { return n_past_; }
    int64_t n_ctx() const { return n_ctx_; }
    void truncate(int64_t n);  // keep the first n own entries

    // Attention observation for later forward() calls (X²L compression, cuda_attention_votes): every
    // layer adds the softmax probabilities that queries at own index >= obs_start give to the own
    // entries into votes[layer][kv_head][entry] (device, n_layer * n_head_kv * votes_stride floats,
    // votes_stride >= the own entries). nullptr turns it off.
    void set_observer(float* votes, int64_t votes_stride, int64_t obs_start);
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
    const CudaGraphStats& graph_stats() const { return graph_stats_; }
    // Forget the hooks (CudaX2L: its reload has landed, nothing is left to wait for).
    void drop_hooks() { hooks_ = CudaPrefixHooks(); }

    size_t kv_bytes() const;      // own entries in use
    size_t device_bytes() const;  // everything this object holds on the device
    void* stream() const { return stream_->handle(); }

  private:
    void forward_batch(const float* x_host, int64_t n, int64_t n_logits, float* logits, const uint8_t* vst);
    void run_rows(const float* x_host, int64_t n, const uint8_t* vst, CudaDeviceBuffer& x_buf, CudaDeviceBuffer& pos_buf);
    // Layer l over m rows appended at own index `first`: x [m, n_embd] (device) in place; pos [m] and
    // vst_ids [n_vst] (device). The hooks run when first_rows (before) / last_rows (after) of the layer.
    // step (device int32 {pos, row, own entries after it}, graph capture only): m = 1 and what changes
    // per token is read from there (the tables were assigned before the capture, no hooks).
    void layer_rows(int l, float* x, int64_t first, int64_t m, const int32_t* pos, int64_t n_vst, const int32_t* vst_ids,
                    bool first_rows, bool last_rows, const int32_t* step = nullptr);
    bool graph_eligible(const uint8_t* vst) const;
    CudaKVSegment own_segment(int l, int64_t n_tokens) const;  // layer l's own entries [0, n_tokens) as a segment
    void decode_step(const float* x_host, int64_t n_logits, float* logits);  // one token through the graph
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
    CudaDeviceBuffer x_all_, pos_all_;  // forward_layer_major: [n, n_embd] hidden states, [n] positions
    float* votes_ = nullptr;
    int64_t votes_stride_ = 0, obs_start_ = 0;
    float* q_capture_ = nullptr;
    int64_t q_capture_rows_ = 0;
    std::vector<std::vector<CudaKVSegment>> segments_;  // [layer][segment]: the prefix, then the own entries
    int32_t pos0_ = 0;
    CudaPrefixHooks hooks_;
    std::vector<CudaSegmentTable> tables_;  // per layer: prefix + own entries
    bool graphs_ = true;
    std::unique_ptr<CudaGraph> graph_;
    bool graph_logits_ = false;                   // the captured graph computes logits
    std::vector<const void*> graph_tables_;       // the tables' device addresses it reads
    std::unique_ptr<CudaHostBuffer> step_host_;   // [n_embd] f32 embedding, then int32 {pos, row, own}
    std::unique_ptr<CudaHostBuffer> logits_host_; // [n_vocab] f32
    CudaDeviceBuffer step_;                       // int32 {pos, row, own}
    CudaGraphStats graph_stats_;
    std::unique_ptr<CudaStream> stream_;    // created after the device is selected
};

// One KVSegment's rows on the device (or in mapped pinned memory), in its [layer][head][entry] layout.
struct CudaKVRows {
    CudaDeviceBuffer dev;
    // L tier only: the index's own rows page-locked in place, or (when the driver refuses) a pinned copy.
    std::unique_ptr<CudaHostRegistration> registered;
    std::unique_ptr<CudaHostBuffer> host;
    const uint8_t* k = nullptr;            // [n_layer][n_head_kv][cap] rows
    const uint8_t* v = nullptr;
    size_t layer_bytes = 0, row_bytes = 0;
    int64_t cap = 0, n = 0;
    DType type = DType::F16;
};
// Copies seg's rows to device memory (Error naming `what` when the attention kernel cannot read its type).
CudaKVRows cuda_upload_rows(const KVSegment& seg, const char* what);
// Page-locks seg's rows where they are (a pinned copy when the driver refuses); mapped=true (integrated
// GPUs) makes k/v device pointers the kernels read in place, otherwise k/v are host DMA sources.
CudaKVRows cuda_pin_rows(const KVSegment& seg, const char* what, bool mapped);
// Layer l's rows of r (k, v: where that layer's K and V rows start) as an attention segment.
CudaKVSegment cuda_layer_view(const CudaKVRows& r, const uint8_t* k, const uint8_t* v);

class CudaX2L {
  public:
    // Uploads the sink and every chunk's H-KVs and page-locks the L-KVs where they are (a pinned copy
    // when the driver refuses); mapped on integrated GPUs, where the device reads them in place and
    // nothing is copied per question.
    // Throws Error for indexes it cannot serve (KV types the attention kernel does not read).
    CudaX2L(const CudaLlm& llm, const VideoIndex& ix, int64_t max_tail_tokens, int64_t n_batch);
    ~CudaX2L();
    CudaX2L(const CudaX2L&) = delete;
    CudaX2L& operator=(const CudaX2L&) = delete;

    // Mixed cache for this selection (sorted chunk indices); starts the layer-pipelined copy of their
    // L-KVs. The tail is cleared; its tokens sit at positions ix.next_pos + i, or with dense positions
    // (beacon) right after the mixed cache's entries, whose moved chunks get re-rotated key copies in the
    // working set (on the copy stream, like the reload). If it throws (device memory for the working
    // set), the mixed cache is the H-only one and nothing is selected.
    void prepare(const std::vector<int>& selected);
    CudaContext& tail() { return *ctx_; }
    // The question pass of the attention and keys scorers: `tokens` on the H-only mixed cache (placed as
    // prepare() places a tail); returns their pre-RoPE queries [n_layer, n_tokens, n_head * head_dim]
    // (host). Leaves the H-only mixed cache with an empty tail (prepare() the selection again afterwards).
    std::vector<float> question_queries(const LlmModel& model, const std::vector<int32_t>& tokens);
    // Blocks until every copy of the last prepare() has landed; fills the copy statistics: copy_seconds
    // (first copy to last, device clock) and wait_seconds (how long the question's compute stream stalled
    // on layers whose copy had not landed yet, plus the host's wait here when it blocks before that).
    void wait_reload();
    const ReloadStats& stats() const { return stats_; }
    size_t resident_bytes() const;  // device: sink + H + working set + tail cache
    size_t working_bytes() const;   // device buffers the reloaded L-KVs (and re-rotated keys) occupy

  private:
    using Where = std::vector<std::vector<std::pair<const uint8_t*, const uint8_t*>>>;  // [layer][chunk] K, V
    std::vector<std::vector<CudaKVSegment>> build_prefix(const std::vector<char>& chosen, const Where& where) const;
    Where in_place(const std::vector<char>& chosen) const;
    int32_t layout(const std::vector<char>& chosen, std::vector<int32_t>* delta) const;

    const CudaLlm& llm_;
    const VideoIndex& ix_;
    CudaKVRows sink_;
    std::vector<CudaKVRows> high_, low_;
    std::unique_ptr<CudaLayerPipeline> pipe_;
    std::unique_ptr<CudaEvent> copy_begin_, copy_end_;
    // Per layer (timing events): its copy landed (copy stream), the question's compute reached its
    // attention (compute stream, first batch only). Their gaps are the stalls in stats().wait_seconds.
    std::vector<CudaEvent> landed_, reached_;
    std::vector<char> reached_recorded_;
    bool pending_ = false;
    std::vector<int> selected_;
    ReloadStats stats_;
    std::unique_ptr<CudaContext> ctx_;
};

// The forward of the X²L bi-level prefill (either compressor: "snapkv" votes or "beacon" VST rows) on
// the device: each level of a chunk runs on top of the segments it attends to (sink + earlier chunks'
// L or H), and the attention votes that drive the compression are computed there too (cuda_attention_votes). The
// chunk's full KV and its votes come back to the host, where the entry selection and the tier rows are
// made exactly as on the CPU (O(entries), cheap next to the forward).
// Memory follows the X²L tiers: the sink and H-KVs are copied to the device on first use and stay
// there (as they will for decoding); L-KVs stay in host memory, page-locked on first use, and are
// streamed layer by layer through a two-slot copy pipeline (layer l computes while layer l+1 copies;
// read in place on integrated GPUs). So the device holds the sink, the H tier and two layers' worth
// of L prefix, not the whole L tier, however long the video. The forward is layer-major
// (CudaContext::forward_layer_major), so a run copies each layer of the prefix once, whatever n_batch.
// Discrete GPUs with room to spare keep L rows in device memory too (low_cache_bytes of them; -1: half
// the device memory free at construction), earliest chunks first since every later chunk attends to
// them, and stream only the rest; the cache is dropped for good when the device fills up.
class CudaPrefill {
  public:
    CudaPrefill(const CudaLlm& llm, int64_t n_batch, int64_t low_cache_bytes = -1);
    ~CudaPrefill();
    CudaPrefill(const CudaPrefill&) = delete;
    CudaPrefill& operator=(const CudaPrefill&) = delete;

    struct PrefixSegment {
        const KVSegment* seg = nullptr;  // alive and unchanged until this object goes
        bool on_host = false;            // an L-tier segment: streamed from page-locked host memory
    };
    // Runs x [n, n_embd] (host) at positions pos0.. on top of `prefix` (temporal order). Appends the n
    // new entries to `tail` (host, empty; its type may be any KV type: the device's f16 rows are
    // converted). With importance: importance [n_layer * n_head_kv * n] = the summed softmax
    // probabilities that queries >= obs_start gave to each new entry (per layer and KV head; the caller
    // normalises). vst (host [n] or nullptr): the beacon rows (CudaContext::forward). keep (sorted rows
    // of [0, n) or nullptr = all): only these rows of the tail are filled, and only they are fetched
    // from the device (beacon keeps its VST rows alone). BudgetError when the device is full.
    void run(const float* x, int64_t n, int32_t pos0, const std::vector<PrefixSegment>& prefix, int64_t obs_start,
             KVSegment& tail, std::vector<float>* importance, const uint8_t* vst = nullptr,
             const std::vector<int32_t>* keep = nullptr);
    size_t device_bytes() const;       // held now: context, votes, resident segments, copy slots
    size_t peak_device_bytes() const { return peak_bytes_; }
    size_t streamed_bytes() const { return streamed_bytes_; }  // L prefix bytes copied host -> device so far
    size_t fetched_bytes() const { return fetched_bytes_; }    // new K/V rows copied device -> host so far
    size_t cached_low_bytes() const;                             // L rows held in device memory now

  private:
    const CudaKVRows& resident(const KVSegment* seg);
    const CudaKVRows& pinned(const KVSegment* seg);
    const CudaKVRows* low_cached(const KVSegment* seg);
    template <typename Fn>
    void with_room(Fn&& alloc);
    const CudaLlm& llm_;
    int64_t n_batch_;
    std::unique_ptr<CudaContext> ctx_;
    CudaDeviceBuffer votes_;  // room for [n_layer, n_head_kv, ctx capacity]; a run uses [.., .., n]
    // deques: a run keeps references to earlier entries while it adds more
    std::deque<std::pair<const KVSegment*, CudaKVRows>> resident_, pinned_, low_cached_;
    size_t low_budget_ = 0;  // bytes of L rows low_cached_ may hold
    static constexpr int kCopySlots = 2;
    std::unique_ptr<CudaLayerPipeline> pipe_;  // discrete GPUs: kCopySlots layers of streamed L prefix
    size_t streamed_bytes_ = 0, fetched_bytes_ = 0, peak_bytes_ = 0;
};

}  // namespace x2l
