// The X²L bi-level prefill's forward on a CUDA device (llm/executor.h PrefillRunner).
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <utility>
#include <vector>

#include "cuda/kv_rows.h"
#include "cuda/llm.h"
#include "llm/executor.h"

namespace x2l {

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
class CudaPrefill final : public PrefillRunner {
  public:
    // interrupt (may be null): polled between the layers of every level's forward (CudaLayerGate).
    CudaPrefill(const CudaLlm& llm, int64_t n_batch, int64_t low_cache_bytes = -1, const Interrupt* interrupt = nullptr);
    ~CudaPrefill() override;
    CudaPrefill(const CudaPrefill&) = delete;
    CudaPrefill& operator=(const CudaPrefill&) = delete;

    // Runs level.x [n, n_embd] (host) at positions pos0.. on top of level.prefix (temporal order; its
    // segments alive and unchanged until this object goes). Appends the n new entries to work's own
    // rows (host, empty; any KV type: the device's f16 rows are converted). With level.votes: [n_layer *
    // n_head_kv * n] = the summed softmax probabilities that queries >= obs_start gave to each new entry
    // (per layer and KV head; the caller normalises). level.vst: the beacon rows (CudaContext::forward).
    // level.keep (sorted rows of [0, n) or nullptr = all): only these rows are filled, and only they are
    // fetched from the device (beacon keeps its VST rows alone). BudgetError when the device is full.
    void run(const PrefillLevel& level, KVCache& work) override;
    bool on_device() const override { return true; }
    PrefillDeviceStats device_stats() const override;
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
    const Interrupt* interrupt_;
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
