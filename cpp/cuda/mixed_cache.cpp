#include "cuda/mixed_cache.h"

#include <algorithm>
#include <chrono>

#include "core/common.h"

namespace x2l {

CudaMixedCache::CudaMixedCache(const CudaLlm& llm, const TieredRows& rows, const MixedCacheLayout& compact_only,
                               int64_t max_tail_tokens, int64_t n_batch, bool graphs)
    : llm_(llm), compact_only_(compact_only) {
    cuda_set_device(llm.device());
    compact_only_rows_.push_back(rows.sink);
    compact_only_rows_.insert(compact_only_rows_.end(), rows.compact.begin(), rows.compact.end());
    sink_ = cuda_upload_rows(*rows.sink, "sink");  // sink and H: resident on the device
    for (const KVSegment* h : rows.compact) high_.push_back(cuda_upload_rows(*h, "H"));
    for (const KVSegment* l : rows.full) low_.push_back(cuda_pin_rows(*l, "L", llm.integrated()));  // the reload's source
    copy_begin_.reset(new CudaEvent(true));
    copy_end_.reset(new CudaEvent(true));
    ctx_.reset(new CudaContext(llm, max_tail_tokens, n_batch));
    prepare(compact_only_);
    ctx_->set_graphs(graphs);
}

CudaMixedCache::~CudaMixedCache() {
    try {
        cuda_set_device(llm_.device());
        wait_reload();  // no copy may target freed buffers
    } catch (...) {
    }
}

// The mixed cache's segments of every layer: sink, then per chunk its L rows (chosen) or H rows, read
// where `where` [layer][chunk] (K, V) says.
std::vector<std::vector<CudaKVSegment>> CudaMixedCache::build_prefix(const std::vector<char>& chosen,
                                                                     const Where& where) const {
    const int L = llm_.config().n_layer;
    const int n = static_cast<int>(high_.size());
    std::vector<std::vector<CudaKVSegment>> per_layer(L);
    for (int l = 0; l < L; ++l) {
        auto& segs = per_layer[l];
        segs.push_back(cuda_layer_view(sink_, sink_.k + l * sink_.layer_bytes, sink_.v + l * sink_.layer_bytes));
        for (int c = 0; c < n; ++c) {
            segs.push_back(cuda_layer_view(chosen[c] ? low_[c] : high_[c], where[l][c].first, where[l][c].second));
        }
    }
    return per_layer;
}

// Where every chunk's rows live in the index: its L rows (chosen) or its H rows, not copied or rotated.
CudaMixedCache::Where CudaMixedCache::in_place(const std::vector<char>& chosen) const {
    const int L = llm_.config().n_layer;
    Where where(L);
    for (int l = 0; l < L; ++l) {
        for (size_t c = 0; c < chosen.size(); ++c) {
            const CudaKVRows& d = chosen[c] ? low_[c] : high_[c];
            where[l].emplace_back(d.k + l * d.layer_bytes, d.v + l * d.layer_bytes);
        }
    }
    return where;
}

void CudaMixedCache::prepare(const MixedCacheLayout& layout) {
    const LlmConfig& cfg = llm_.config();
    const int L = cfg.n_layer;
    const int n = static_cast<int>(high_.size());
    if (layout.full.size() != high_.size() || layout.delta.size() != high_.size())
        throw Error("CudaMixedCache::prepare: the layout has " + std::to_string(layout.full.size()) + " chunks, the index " +
                    std::to_string(n));
    cuda_set_device(llm_.device());
    wait_reload();
    cuda_device_synchronize();  // the tail's stream is done with the previous working set
    // From here on the context must never keep a prefix into buffers that a failure below frees: it is
    // first emptied, then given the mixed cache once it is built (the H-only one if the copy fails).
    ctx_->set_prefix({});
    stats_ = ReloadStats();
    const std::vector<char>& chosen = layout.full;
    // Dense positions (beacon): a chunk behind one that changed tier moves by delta positions; its keys
    // get a re-rotated copy in the working set (V does not depend on the position and is read where it is).
    const std::vector<int32_t>& delta = layout.delta;
    const bool discrete = !llm_.integrated();  // integrated: L rows are read in place, never copied
    size_t slot = 0;                           // working-set bytes per layer
    for (int c = 0; c < n; ++c) {
        if (chosen[c] && discrete) {
            slot += 2 * CudaLayerPipeline::aligned(low_[c].layer_bytes);
        } else if (delta[c] != 0) {
            slot += CudaLayerPipeline::aligned((chosen[c] ? low_[c] : high_[c]).layer_bytes);
        }
    }
    const bool staged = slot > 0;
    const RopeMode mode = cfg.rope_type == RopeType::Neox ? RopeMode::Neox : RopeMode::Norm;
    Where where = in_place(chosen);  // [layer][chunk] -> that chunk's K and V rows of the layer for this question
    try {
        if (staged) {
            cuda_reserve_pipeline(pipe_, slot, slot, L);
            void* cs = pipe_->copy_stream();
            copy_begin_->record(cs);
            if (landed_.size() != static_cast<size_t>(L)) {
                landed_.clear();
                reached_.clear();
                for (int l = 0; l < L; ++l) {
                    landed_.emplace_back(true);
                    reached_.emplace_back(true);
                }
            }
            reached_recorded_.assign(static_cast<size_t>(L), 0);
            for (int l = 0; l < L; ++l) {
                pipe_->begin(l);
                for (int c = 0; c < n; ++c) {
                    const CudaKVRows& d = chosen[c] ? low_[c] : high_[c];
                    const size_t off = static_cast<size_t>(l) * d.layer_bytes;
                    const int64_t rows = static_cast<int64_t>(cfg.n_head_kv) * d.cap;  // the layer's K block
                    auto& [k, v] = where[l][c];
                    if (chosen[c] && discrete) {  // the reload: host -> working set, keys rotated there
                        void* kd = pipe_->stage(d.k + off, d.layer_bytes);
                        v = static_cast<const uint8_t*>(pipe_->stage(d.v + off, d.layer_bytes));
                        stats_.bytes += 2 * d.layer_bytes;
                        if (delta[c] != 0)
                            cuda_rerotate_keys(d.type, kd, kd, rows, d.row_bytes, cfg.head_dim, cfg.rope_dim, cfg.rope_base,
                                               mode, delta[c], cs);
                        k = static_cast<const uint8_t*>(kd);
                    } else if (delta[c] != 0) {  // a rotated copy of the keys, read from where they are
                        void* kd = pipe_->take(d.layer_bytes);
                        cuda_rerotate_keys(d.type, d.k + off, kd, rows, d.row_bytes, cfg.head_dim, cfg.rope_dim, cfg.rope_base,
                                           mode, delta[c], cs);
                        k = static_cast<const uint8_t*>(kd);
                    }
                }
                pipe_->end();
                landed_[l].record(cs);
            }
            copy_end_->record(cs);
            pending_ = true;
        }
    } catch (...) {
        // Leave the H-only mixed cache: no chunk reloaded, nothing pointing into freed slots. (With
        // dense positions the H-only cache needs no rotation: H rows were made at these positions.)
        try {
            if (pipe_) pipe_->reset();
        } catch (...) {
        }
        pending_ = false;
        stats_ = ReloadStats();
        ctx_->set_prefix(build_prefix(compact_only_.full, in_place(compact_only_.full)));
        throw;
    }
    CudaPrefixHooks wait;
    if (staged) {
        wait.before = [this](int layer, void* stream, std::vector<CudaKVSegment>&) {
            if (!pipe_) return;
            if (!reached_recorded_[layer]) {  // the first batch is the one that can stall
                reached_[layer].record(stream);
                reached_recorded_[layer] = 1;
            }
            pipe_->wait_ready(layer, stream);
        };
    }
    ctx_->set_prefix(build_prefix(chosen, where), std::move(wait));
    stats_.n_chunks = static_cast<int>(std::count(chosen.begin(), chosen.end(), 1));
}

void CudaMixedCache::forward(const float* x, int64_t n, const int32_t* pos, int64_t n_logits, float* logits) {
    ctx_->forward(x, n, pos, n_logits, logits);
    wait_reload();  // already landed (every layer waited for it); records the copy time
}

std::vector<float> CudaMixedCache::question_queries(const float* x, int64_t nq, const int32_t* pos) {
    const LlmConfig& c = llm_.config();
    if (nq <= 0) throw Error("the question is empty");
    const int64_t QD = static_cast<int64_t>(c.n_head) * c.head_dim;
    prepare(compact_only_);  // H-only: the video as this question sees it without reload
    CudaDeviceBuffer captured(static_cast<size_t>(c.n_layer * nq * QD) * sizeof(float));  // [n_layer, nq, QD]
    ctx_->set_query_capture(static_cast<float*>(captured.data()), nq);
    std::vector<float> last_logits(static_cast<size_t>(c.n_vocab));
    try {
        ctx_->forward(x, nq, pos, 1, last_logits.data());  // synchronizes
    } catch (...) {
        ctx_->set_query_capture(nullptr, 0);
        throw;
    }
    ctx_->set_query_capture(nullptr, 0);
    ctx_->truncate(0);
    std::vector<float> q(static_cast<size_t>(c.n_layer * nq * QD));
    captured.download(q.data(), q.size() * sizeof(float));
    return q;
}

void CudaMixedCache::wait_reload() {
    if (!pending_) return;
    cuda_set_device(llm_.device());
    const auto t0 = std::chrono::steady_clock::now();
    copy_end_->synchronize();
    stats_.copy_seconds = copy_end_->elapsed_ms_since(*copy_begin_) / 1e3;
    bool any_reached = false;
    double stalled_ms = 0;
    for (size_t l = 0; l < reached_recorded_.size(); ++l) {
        if (!reached_recorded_[l]) continue;
        any_reached = true;
        reached_[l].synchronize();
        stalled_ms += std::max(0.0f, landed_[l].elapsed_ms_since(reached_[l]));  // > 0: compute got there first
    }
    // Nothing reached yet: the host blocked here, before the question (reload, wait, then prefill). Its
    // wall-clock wait also counts any time the thread was preempted or descheduled, which is no reload
    // stall: it cannot have waited on the copies for longer than they ran (the device span).
    const double host_wait = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats_.wait_seconds = any_reached ? stalled_ms / 1e3 : std::min(host_wait, stats_.copy_seconds);
    pending_ = false;
    // Every copy has landed and the stalls are counted: the per-layer waits have nothing left to do,
    // and without hooks the tokens that follow can replay the decode graph.
    ctx_->drop_hooks();
}

size_t CudaMixedCache::working_bytes() const { return pipe_ ? pipe_->slot_bytes() * static_cast<size_t>(pipe_->n_slots()) : 0; }

size_t CudaMixedCache::resident_bytes() const {
    size_t b = sink_.dev.size() + working_bytes() + ctx_->device_bytes();
    for (const auto& h : high_) b += h.dev.size();
    return b;
}

}  // namespace x2l
