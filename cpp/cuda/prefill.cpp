#include "cuda/prefill.h"

#include <algorithm>
#include <cstring>

#include "core/common.h"

namespace x2l {

namespace {
constexpr size_t kF16 = 2;
}  // namespace

CudaPrefill::CudaPrefill(const CudaLlm& llm, int64_t n_batch, int64_t low_cache_bytes, const Interrupt* interrupt)
    : llm_(llm), n_batch_(n_batch), interrupt_(interrupt) {
    if (n_batch <= 0) throw Error("n_batch must be > 0");
    cuda_set_device(llm.device());
    // Integrated GPUs read the L rows in place: a device copy would only duplicate them in the same DRAM.
    if (llm.integrated()) {
        low_budget_ = 0;
    } else {
        low_budget_ = low_cache_bytes >= 0 ? static_cast<size_t>(low_cache_bytes) : cuda_device_info(llm.device()).free_mem / 2;
    }
}

CudaPrefill::~CudaPrefill() {
    try {
        cuda_set_device(llm_.device());
        cuda_device_synchronize();  // no kernel or copy may still touch what the members free
    } catch (...) {
    }
}

namespace {
// The rows cached for seg, if they are still its rows (a segment is never refilled while the prefill runs).
const CudaKVRows* find_rows(const std::deque<std::pair<const KVSegment*, CudaKVRows>>& cache, const KVSegment* seg) {
    for (const auto& r : cache) {
        if (r.first == seg && r.second.n == seg->size() && r.second.cap == seg->capacity()) return &r.second;
    }
    return nullptr;
}
}  // namespace

const CudaKVRows& CudaPrefill::resident(const KVSegment* seg) {
    if (const CudaKVRows* r = find_rows(resident_, seg)) return *r;
    resident_.emplace_back(seg, cuda_upload_rows(*seg, "prefix"));
    return resident_.back().second;
}

// seg's rows in device memory when they are cached there or fit the L cache's budget (nullptr: stream them).
const CudaKVRows* CudaPrefill::low_cached(const KVSegment* seg) {
    if (const CudaKVRows* r = find_rows(low_cached_, seg)) return r;
    if (cached_low_bytes() + 2 * seg->layer_bytes() * static_cast<size_t>(seg->n_layer()) > low_budget_) return nullptr;
    try {
        low_cached_.emplace_back(seg, cuda_upload_rows(*seg, "L"));
    } catch (const BudgetError&) {
        low_budget_ = 0;  // the device is fuller than it was: stream from now on
        return nullptr;
    }
    return &low_cached_.back().second;
}

const CudaKVRows& CudaPrefill::pinned(const KVSegment* seg) {
    if (const CudaKVRows* r = find_rows(pinned_, seg)) return *r;
    pinned_.emplace_back(seg, cuda_pin_rows(*seg, "L", llm_.integrated()));
    return pinned_.back().second;
}

// Runs `alloc`; when the device is full and L rows are cached there, drops that cache for good (the
// L prefix is streamed from then on) and tries again. Only while no view of the cache is in use.
template <typename Fn>
void CudaPrefill::with_room(Fn&& alloc) {
    try {
        alloc();
    } catch (const BudgetError&) {
        if (low_cached_.empty()) throw;
        cuda_device_synchronize();
        low_cached_.clear();
        low_budget_ = 0;
        alloc();
    }
}

size_t CudaPrefill::cached_low_bytes() const {
    size_t b = 0;
    for (const auto& r : low_cached_) b += r.second.dev.size();
    return b;
}

size_t CudaPrefill::device_bytes() const {
    size_t b = votes_.size() + (ctx_ ? ctx_->device_bytes() : 0);
    for (const auto& r : resident_) b += r.second.dev.size();
    b += cached_low_bytes();
    if (pipe_) b += pipe_->slot_bytes() * static_cast<size_t>(pipe_->n_slots());
    return b;
}

PrefillDeviceStats CudaPrefill::device_stats() const {
    PrefillDeviceStats d;
    d.peak_bytes = peak_bytes_;
    d.streamed_bytes = streamed_bytes_;
    d.cached_low_bytes = cached_low_bytes();
    d.fetched_bytes = fetched_bytes_;
    return d;
}

void CudaPrefill::run(const PrefillLevel& level, KVCache& work) {
    const float* x = level.x;
    const int64_t n = level.n;
    const std::vector<PrefixRows>& prefix = level.prefix;
    std::vector<float>* importance = level.votes;
    const uint8_t* vst = level.vst;
    const std::vector<int32_t>* keep = level.keep;
    KVSegment& tail = work.tail();
    const LlmConfig& c = llm_.config();
    if (n <= 0) throw Error("CudaPrefill::run: empty input");
    if (tail.size() != 0 || tail.capacity() < n) throw Error("CudaPrefill::run: the tail must be empty and hold n entries");
    for (size_t j = 0; keep && j < keep->size(); ++j) {
        if ((*keep)[j] < 0 || (*keep)[j] >= n || (j > 0 && (*keep)[j] <= (*keep)[j - 1]))
            throw Error("CudaPrefill::run: keep must be sorted, unique rows in [0, n)");
    }
    cuda_set_device(llm_.device());
    const int64_t HK = static_cast<int64_t>(c.n_head_kv) * c.n_layer;
    for (const PrefixRows& p : prefix) {
        if (!p.rows) throw Error("CudaPrefill::run: null prefix segment");
    }
    // Device memory this run needs comes first (it may evict the L cache: no view of it exists yet).
    if (!ctx_ || ctx_->n_ctx() < n) {
        ctx_.reset();
        votes_ = CudaDeviceBuffer();
        with_room([&] {
            ctx_.reset(new CudaContext(llm_, n, n_batch_, /*row_major=*/false));
            ctx_->set_interrupt(interrupt_);
            votes_ = CudaDeviceBuffer(static_cast<size_t>(HK * n) * sizeof(float));
        });
    }
    for (const PrefixRows& p : prefix) {
        if (!p.on_host && p.rows->size() > 0) with_room([&] { resident(p.rows); });
    }
    const int L = c.n_layer;
    std::vector<const CudaKVRows*> streamed;  // discrete GPUs: L-tier segments copied per layer
    std::vector<size_t> streamed_at;          // their places in a layer's segment list
    int64_t step = 0, staged = 0;             // layers attended to / copied so far (the forward is layer-major)
    std::vector<std::vector<std::pair<const void*, const void*>>> where(kCopySlots);  // [slot][streamed] K, V
    // The context's prefix: per layer, resident views (sink, H, cached L), mapped views (integrated), and
    // placeholders that the hooks point at the copy slot holding that layer of the streamed segments. If
    // the copy slots or the segment tables do not fit while L rows are cached, the cache goes and the
    // prefix is made again, streaming those rows.
    with_room([&] {
        streamed.clear();
        streamed_at.clear();
        try {
            std::vector<std::vector<CudaKVSegment>> per_layer(static_cast<size_t>(L));
            for (const PrefixRows& p : prefix) {
                if (p.rows->size() == 0) continue;
                const CudaKVRows* cached = p.on_host && !llm_.integrated() ? low_cached(p.rows) : nullptr;
                const CudaKVRows& r = cached ? *cached : p.on_host ? pinned(p.rows) : resident(p.rows);
                const bool copied = p.on_host && !llm_.integrated() && !cached;
                if (copied) {
                    streamed.push_back(&r);
                    streamed_at.push_back(per_layer[0].size());
                }
                for (int l = 0; l < L; ++l) {
                    per_layer[l].push_back(copied ? cuda_layer_view(r, nullptr, nullptr)
                                                  : cuda_layer_view(r, r.k + l * r.layer_bytes, r.v + l * r.layer_bytes));
                }
            }
            CudaPrefixHooks hooks;
            if (!streamed.empty()) {
                size_t slot = 0;
                for (const CudaKVRows* r : streamed) slot += 2 * CudaLayerPipeline::aligned(r->layer_bytes);
                // The prefix grows by one chunk per level: room for a few more, so that the slots are not
                // reallocated for every chunk.
                cuda_reserve_pipeline(pipe_, slot, slot + slot / 4, kCopySlots);
                // The forward runs every row through layer l before layer l + 1 (forward_layer_major), so
                // each layer of the L prefix is copied once per run: layer t is staged in slot t % kCopySlots
                // once layer t - kCopySlots released it, and the copy of the next layer overlaps this
                // one's compute.
                auto stage = [&](int64_t t) {
                    pipe_->begin(static_cast<int>(t));
                    auto& w = where[static_cast<size_t>(t % kCopySlots)];
                    w.clear();
                    for (const CudaKVRows* r : streamed) {
                        const size_t off = static_cast<size_t>(t) * r->layer_bytes;
                        const void* k = pipe_->stage(r->k + off, r->layer_bytes);
                        const void* v = pipe_->stage(r->v + off, r->layer_bytes);
                        w.emplace_back(k, v);
                        streamed_bytes_ += 2 * r->layer_bytes;
                    }
                    pipe_->end();
                };
                hooks.before = [&, L, stage](int, void* stream, std::vector<CudaKVSegment>& segs) {
                    while (staged < L && staged <= step + kCopySlots - 1) stage(staged++);
                    pipe_->wait_ready(static_cast<int>(step), stream);
                    const auto& w = where[static_cast<size_t>(step % kCopySlots)];
                    for (size_t j = 0; j < streamed.size(); ++j) {
                        segs[streamed_at[j]].k = w[j].first;
                        segs[streamed_at[j]].v = w[j].second;
                    }
                };
                hooks.after = [&](int, void* stream) {
                    pipe_->release(static_cast<int>(step), stream);
                    ++step;
                };
            }
            ctx_->set_prefix(std::move(per_layer), std::move(hooks));
        } catch (...) {
            ctx_->set_prefix({});  // a failed attempt leaves no view of the L cache behind
            throw;
        }
    });
    if (importance) {
        votes_.zero(ctx_->stream());
        ctx_->set_observer(static_cast<float*>(votes_.data()), n, level.obs_start, level.votes_max);  // [n_layer, n_head_kv, n]
    } else {
        ctx_->set_observer(nullptr, 0, 0);
    }
    const int A = c.n_pos_axes;
    std::vector<int32_t> pos(static_cast<size_t>(A * n));  // [A, n]: explicit (M-RoPE media) or pos0 + i on every axis
    for (int64_t i = 0; i < A * n; ++i) pos[i] = level.pos ? level.pos[i] : level.pos0 + static_cast<int32_t>(i % n);
    try {
        // Synchronizes: the rows and votes are complete. A cancel between layers throws Cancelled.
        ctx_->forward_layer_major(x, n, pos.data(), vst);
    } catch (...) {
        // The hooks point into this frame, and queued work may still read the copy slots.
        try {
            cuda_device_synchronize();
            ctx_->set_prefix({});
            if (pipe_) pipe_->reset();
        } catch (...) {
        }
        throw;
    }
    // Drop the hooks (they point into this frame). This empties the context's count of own entries;
    // their rows stay in its K/V buffers, read below.
    ctx_->set_prefix({});
    peak_bytes_ = std::max(peak_bytes_, device_bytes());

    // The new entries back to the host: [n, n_head_kv, head_dim] f16 per layer -> tail's layout and type.
    // With `keep` only those rows cross (gathered on the device first); the tail's other rows stay unset.
    const int64_t KD = static_cast<int64_t>(c.n_head_kv) * c.head_dim;
    tail.append(pos.data(), n);
    const size_t row_bytes = static_cast<size_t>(KD) * kF16;
    CudaDeviceBuffer keep_ids, gathered;  // [n_rows] row ids; [2][n_rows, KD] f16 K, then V
    const int64_t n_rows = keep ? static_cast<int64_t>(keep->size()) : n;
    if (keep && n_rows < n && n_rows > 0) {
        try {
            keep_ids = CudaDeviceBuffer(static_cast<size_t>(n_rows) * sizeof(int32_t));
            gathered = CudaDeviceBuffer(2 * static_cast<size_t>(n_rows) * row_bytes);
            keep_ids.upload(keep->data(), keep_ids.size());
        } catch (const BudgetError&) {
            keep_ids = CudaDeviceBuffer();  // no room to gather: fetch every row instead
            gathered = CudaDeviceBuffer();
        }
    }
    const bool gather = gathered.size() > 0;
    const int64_t n_fetch = gather ? n_rows : n;
    std::vector<uint16_t> kh(static_cast<size_t>(n_fetch * KD)), vh(kh.size());
    std::vector<float> kf(static_cast<size_t>(KD)), vf(kf.size());
    const size_t head_bytes = static_cast<size_t>(c.head_dim) * kF16;
    const size_t fetch_bytes = static_cast<size_t>(n_fetch) * row_bytes;
    void* s = ctx_->stream();
    for (int l = 0; l < c.n_layer; ++l) {
        if (gather) {
            uint8_t* g = static_cast<uint8_t*>(gathered.data());
            const int32_t* ids = static_cast<const int32_t*>(keep_ids.data());
            cuda_gather_rows(ctx_->k_cache(l).data(), n, row_bytes, ids, n_rows, g, s);
            cuda_gather_rows(ctx_->v_cache(l).data(), n, row_bytes, ids, n_rows, g + fetch_bytes, s);
            gathered.download(kh.data(), fetch_bytes, 0, s);  // synchronous: kh is read below
            gathered.download(vh.data(), fetch_bytes, fetch_bytes, s);
        } else {
            ctx_->k_cache(l).download(kh.data(), fetch_bytes, 0, s);
            ctx_->v_cache(l).download(vh.data(), fetch_bytes, 0, s);
        }
        fetched_bytes_ += 2 * fetch_bytes;
        for (int64_t j = 0; j < n_rows; ++j) {
            const int64_t i = keep ? (*keep)[j] : j;  // the tail's row
            const int64_t f = gather ? j : i;         // the fetched row
            if (tail.type() == DType::F16) {  // the usual case (kv_type f16): the rows as they are
                for (int h = 0; h < c.n_head_kv; ++h) {
                    std::memcpy(tail.k_row_mut(l, h, i), kh.data() + f * KD + h * c.head_dim, head_bytes);
                    std::memcpy(tail.v_row_mut(l, h, i), vh.data() + f * KD + h * c.head_dim, head_bytes);
                }
                continue;
            }
            fp16_to_fp32_row(kh.data() + f * KD, kf.data(), KD);
            fp16_to_fp32_row(vh.data() + f * KD, vf.data(), KD);
            tail.store(l, i, kf.data(), vf.data());
        }
    }
    if (importance) {
        importance->resize(static_cast<size_t>(HK * n));
        votes_.download(importance->data(), importance->size() * sizeof(float));
        ctx_->set_observer(nullptr, 0, 0);
    }
}

}  // namespace x2l
