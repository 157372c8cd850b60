// The decoder LLM's executor: what a backend implements so that the session, the X²L prefill and the X²L
// decoder run the model on it without knowing which backend it is. Three kinds of work:
//   LlmContext    - a KV cache of the rows it appended: forward rows, truncate (the session's chat);
//   PrefillRunner - one level of the X²L bi-level prefill: rows on top of borrowed KV rows (sink, earlier
//                   chunks' L or H), with the attention votes or the beacon rows that compression needs;
//   MixedCache    - the X²L decoder's cache: a sink and per chunk its compact (H) or full (L) rows, as a
//                   MixedCacheLayout says, then the question's rows; the full rows are reloaded while the
//                   question runs.
// The X²L layer decides what goes where (cpp/x2l/plan.h) and hands it over; an executor only computes.
// Implementations: the CPU (llm/cpu_executor.h) and CUDA (cuda/executor.h); backends.cpp picks one.
//
// Positions: row i of a forward sits at pos[i] (one RoPE position per row). A model with multi-axis
// rotary positions (M-RoPE, LlmConfig::n_pos_axes = 3: temporal, height, width per token) takes
// [n_pos_axes, n] arrays in LlmContext::forward; the X²L layer only forwards them.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/formats.h"
#include "core/interrupt.h"
#include "cpu/kv_cache.h"
#include "cpu/reload.h"

namespace x2l {

class LlmModel;
class ThreadPool;

struct SessionOptions {
    int n_threads = 0;        // 0: all hardware threads
    int64_t n_ctx = 0;        // 0: min(model's training context, 4096)
    DType kv_type = DType::F16;
    int64_t n_batch = 256;    // rows per forward call during prompt processing
    int device = -1;          // CUDA device (-1: the CPU backend)
    bool cuda_graphs = true;  // single-token device forwards replay a CUDA graph
};

// How often a device context captured and replayed its decode graph; note: why it stopped using graphs.
struct GraphStats {
    int64_t captures = 0, replays = 0;
    std::string note;
};

// ---------------------------------------------------------------- a KV cache of own rows

class LlmContext {
  public:
    virtual ~LlmContext() = default;
    // Runs rows x [n, n_embd] (host) at positions pos [n_pos_axes, n] after everything the cache holds, appending
    // their K/V; logits of the last n_logits rows go to logits [n_logits, n_vocab] (host). n <= the
    // executor's n_batch (eval_rows() cuts longer inputs). On failure the cache is as before the call.
    virtual void forward(const float* x, int64_t n, const int32_t* pos, int64_t n_logits, float* logits) = 0;
    virtual int64_t size() const = 0;      // own rows
    virtual void truncate(int64_t n) = 0;  // keep the first n own rows
    virtual size_t kv_bytes() const = 0;   // the own rows' K/V storage
    virtual size_t device_bytes() const { return 0; }  // everything it holds in device memory
    virtual GraphStats graph_stats() const { return GraphStats(); }
};

// The eval contract of LlmSession and X2LDecoder: n rows, n_batch at a time (rows(b, m, x) writes rows
// [b, b + m) into x [m, n_embd]), at positions start + i; the last row's logits into last_logits
// [n_vocab] and, with all_out, every row's into all_out [n, n_vocab]. On failure (Cancelled included:
// interrupt is checked before every batch) no row is kept.
// A model with n_pos_axes > 1 (M-RoPE) gets position start + i on every axis (text).
using RowSource = std::function<void(int64_t begin, int64_t count, float* x)>;
void eval_rows(LlmContext& ctx, int64_t n_embd, int64_t n_vocab, int64_t n, int64_t n_batch, int32_t start,
               const RowSource& rows, std::vector<float>& last_logits, std::vector<float>* all_out,
               int n_pos_axes = 1, const Interrupt* interrupt = nullptr);
// The same with explicit positions pos [n_pos_axes, n] (M-RoPE rows t, h, w of a prompt with media).
void eval_rows_at(LlmContext& ctx, int64_t n_embd, int64_t n_vocab, int64_t n, int64_t n_batch, int n_pos_axes,
                  const int32_t* pos, const RowSource& rows, std::vector<float>& last_logits,
                  std::vector<float>* all_out, const Interrupt* interrupt = nullptr);

// ---------------------------------------------------------------- the X²L prefill's forward

// A borrowed segment a prefill level attends to. on_host: an L-tier segment, which a device backend
// streams from host memory layer by layer instead of keeping it in device memory.
struct PrefixRows {
    const KVSegment* rows = nullptr;
    bool on_host = false;
};

// One level of one chunk: rows on top of `prefix`, and what the compressors ask of the forward.
struct PrefillLevel {
    const float* x = nullptr;  // [n, n_embd] input rows (host)
    int64_t n = 0;
    int32_t pos0 = 0;          // row i sits at position pos0 + i (on every axis)
    const int32_t* pos = nullptr;  // or explicit positions [n_pos_axes, n] (M-RoPE media)
    std::vector<PrefixRows> prefix;  // in temporal order
    // snapkv, kvzip: votes [n_layer, n_head_kv, n] = the softmax probabilities that rows >= obs_start give
    // each new row, summed over the query heads of its KV head (the caller normalises), or with votes_max
    // the largest of them (over those rows and query heads).
    std::vector<float>* votes = nullptr;
    int64_t obs_start = 0;
    bool votes_max = false;
    // beacon: [n] rows flagged 1 are Video-XL summarisation tokens, whose q/k/v come from the VST projections.
    const uint8_t* vst = nullptr;
    // Sorted rows of [0, n) the caller reads (nullptr: all); a device fetches only these.
    const std::vector<int32_t>* keep = nullptr;
};

struct PrefillDeviceStats {
    size_t peak_bytes = 0;        // the most device memory the prefill held
    size_t streamed_bytes = 0;    // L prefix bytes copied host -> device so far
    size_t cached_low_bytes = 0;  // L rows held in device memory now
    size_t fetched_bytes = 0;     // new K/V rows copied device -> host so far
};

class PrefillRunner {
  public:
    virtual ~PrefillRunner() = default;
    // Runs the level with `work` as the chunk's working cache: its own rows (empty on entry, capacity
    // >= n) receive the n new rows (only the `keep` rows when given), in work's KV type.
    virtual void run(const PrefillLevel& level, KVCache& work) = 0;
    virtual bool on_device() const { return false; }
    virtual PrefillDeviceStats device_stats() const { return PrefillDeviceStats(); }
    // Why a device prefill went over to the CPU ("" otherwise).
    virtual const std::string& note() const { static const std::string none; return none; }
};

// ---------------------------------------------------------------- the X²L decoder's cache

// The rows a mixed cache is assembled from: a sink, then per chunk a compact version (H, resident where
// the backend computes) and a full one (L, in host memory, reloaded for the chunks a question selects).
struct TieredRows {
    const KVSegment* sink = nullptr;
    std::vector<const KVSegment*> compact, full;
};

// One mixed cache: the sink, then per chunk its full or compact rows, in temporal order.
struct MixedCacheLayout {
    std::vector<char> full;      // per chunk: 1 = its full (L) rows, 0 = its compact (H) rows
    std::vector<int32_t> delta;  // per chunk: positions its keys move by (dense positions), 0 = none
    int32_t tail_pos = 0;        // position of the first row after the cache (the question's)
};

class MixedCache : public LlmContext {
  public:
    // Builds the mixed cache of `layout` (own rows cleared) and starts copying its full rows (and the
    // moved keys). forward() waits for each layer's rows. If it throws (device memory), the cache is the
    // compact-only one.
    virtual void prepare(const MixedCacheLayout& layout) = 0;
    // The question pass of the attention and keys scorers: rows x [n, n_embd] at pos [n] on the
    // compact-only cache; returns their pre-RoPE queries [n_layer, n, n_head * head_dim] and leaves the
    // compact-only cache with no own rows (prepare() again afterwards).
    virtual std::vector<float> question_queries(const float* x, int64_t n, const int32_t* pos) = 0;
    virtual void wait_reload() = 0;  // blocks until the last prepare()'s copies have landed
    virtual const ReloadStats& reload_stats() const = 0;
    virtual size_t working_bytes() const = 0;   // buffers the reloaded rows occupy
    virtual size_t resident_bytes() const = 0;  // what the cache keeps where it computes
    // The cache's segments before the own rows, as host rows: sink, then per chunk (the CPU: the current
    // layout, reloaded rows complete after wait_reload(); a device: the compact-only cache).
    virtual const std::vector<const KVSegment*>& host_prefix() const = 0;
    virtual bool on_device() const { return false; }
};

// ---------------------------------------------------------------- the executor

class LlmExecutor {
  public:
    virtual ~LlmExecutor() = default;
    virtual const char* backend() const = 0;     // "cpu" or "cuda"
    virtual std::string device_name() const = 0; // "cpu" or the device's name
    virtual size_t device_bytes() const = 0;     // weights held in device memory (0 on the CPU)
    virtual size_t workspace_bytes() const = 0;  // host scratch of the CPU forward
    virtual std::unique_ptr<LlmContext> new_context(int64_t n_ctx) = 0;
    // low_cache_bytes: device L rows a prefill may keep instead of streaming them (-1: half the free memory).
    virtual std::unique_ptr<PrefillRunner> new_prefill(int64_t low_cache_bytes) = 0;
    // compact_only: the layout with no full rows (the scorers' pass and the fallback after a failed
    // prepare). note: why a device executor keeps this cache on the CPU ("" otherwise).
    virtual std::unique_ptr<MixedCache> new_mixed_cache(const TieredRows& rows, const MixedCacheLayout& compact_only,
                                                        int64_t max_tail, std::string& note) = 0;

    // Cancellation: everything this executor makes polls it (interrupt()->check()) between the pieces
    // of its work that the host sees (the CPU: every layer of every forward; a device: every batch,
    // each of which synchronizes) and throws Cancelled. The owner (LlmSession) sets it once; nullptr: none.
    // An executor that wraps others (backends.cpp's device + CPU pair) passes it on to them.
    virtual void set_interrupt(const Interrupt* interrupt) { interrupt_ = interrupt; }
    const Interrupt* interrupt() const { return interrupt_; }

  private:
    const Interrupt* interrupt_ = nullptr;
};

// Builds a session's executor: backends.cpp's make_llm_executor in the module; the LLM layer never names a backend.
using LlmExecutorFactory =
    std::function<std::unique_ptr<LlmExecutor>(const LlmModel& model, ThreadPool& pool, const SessionOptions& opt)>;

}  // namespace x2l
