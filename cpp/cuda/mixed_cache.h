// The X²L decoder's mixed cache on a CUDA device (llm/executor.h MixedCache): the sink and every chunk's
// compact (H) rows resident in device memory, the full (L) rows page-locked in host memory, and per
// question the full rows of the chosen chunks copied layer by layer on a copy stream while the
// question's prefill runs (each layer waits on its own event), then decoding on sink + [L or H per
// chunk] + tail; chunks whose keys move (dense positions) get re-rotated key copies on the way. What
// goes where comes from the layout (cpp/x2l/plan.h); this only moves rows and computes.
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "cuda/kv_rows.h"
#include "cuda/llm.h"
#include "llm/executor.h"

namespace x2l {

class CudaMixedCache final : public MixedCache {
  public:
    // Uploads the sink and every chunk's compact rows and page-locks the full rows where they are (a
    // pinned copy when the driver refuses); mapped on integrated GPUs, where the device reads them in
    // place and nothing is copied per question. Throws Error for rows the attention kernel cannot read,
    // BudgetError when the device cannot hold them. rows' segments must outlive this object.
    CudaMixedCache(const CudaLlm& llm, const TieredRows& rows, const MixedCacheLayout& compact_only,
                   int64_t max_tail_tokens, int64_t n_batch, bool graphs);
    ~CudaMixedCache() override;
    CudaMixedCache(const CudaMixedCache&) = delete;
    CudaMixedCache& operator=(const CudaMixedCache&) = delete;

    // The mixed cache of this layout; starts the layer-pipelined copy of the chosen full rows. If it
    // throws (device memory for the working set), the cache is the compact-only one.
    void prepare(const MixedCacheLayout& layout) override;
    void forward(const float* x, int64_t n, const int32_t* pos, int64_t n_logits, float* logits) override;
    std::vector<float> question_queries(const float* x, int64_t n, const int32_t* pos) override;
    int64_t size() const override { return ctx_->n_past(); }
    void truncate(int64_t n) override { ctx_->truncate(n); }
    size_t kv_bytes() const override { return ctx_->kv_bytes(); }
    size_t device_bytes() const override { return resident_bytes(); }
    GraphStats graph_stats() const override { return ctx_->graph_stats(); }
    // Blocks until every copy of the last prepare() has landed; fills the copy statistics: copy_seconds
    // (first copy to last, device clock) and wait_seconds (how long the question's compute stream stalled
    // on layers whose copy had not landed yet, plus the host's wait here when it blocks before that).
    void wait_reload() override;
    const ReloadStats& reload_stats() const override { return stats_; }
    size_t working_bytes() const override;   // device buffers the reloaded rows (and re-rotated keys) occupy
    size_t resident_bytes() const override;  // device: sink + compact rows + working set + tail cache
    const std::vector<const KVSegment*>& host_prefix() const override { return compact_only_rows_; }
    bool on_device() const override { return true; }

  private:
    using Where = std::vector<std::vector<std::pair<const uint8_t*, const uint8_t*>>>;  // [layer][chunk] K, V
    std::vector<std::vector<CudaKVSegment>> build_prefix(const std::vector<char>& full, const Where& where) const;
    Where in_place(const std::vector<char>& full) const;

    const CudaLlm& llm_;
    MixedCacheLayout compact_only_;
    std::vector<const KVSegment*> compact_only_rows_;  // host: sink + every chunk's compact rows
    CudaKVRows sink_;
    std::vector<CudaKVRows> high_, low_;  // per chunk: compact rows (device), full rows (page-locked host)
    std::unique_ptr<CudaLayerPipeline> pipe_;
    std::unique_ptr<CudaEvent> copy_begin_, copy_end_;
    // Per layer (timing events): its copy landed (copy stream), the question's compute reached its
    // attention (compute stream, first batch only). Their gaps are the stalls in stats().wait_seconds.
    std::vector<CudaEvent> landed_, reached_;
    std::vector<char> reached_recorded_;
    bool pending_ = false;
    ReloadStats stats_;
    std::unique_ptr<CudaContext> ctx_;
};

}  // namespace x2l
