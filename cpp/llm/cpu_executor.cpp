#include "llm/cpu_executor.h"

#include <algorithm>
#include <cstring>

#include "core/common.h"

namespace x2l {

namespace {

// Runs rows x [n, n_embd] (n <= n_batch: one LlmModel::forward) over `cache`, x copied to `scratch`
// first (the forward works in place).
void forward_rows(const LlmExecutor& exec, const LlmModel& model, ThreadPool& pool, Workspace& ws,
                  std::vector<float>& scratch, KVCache& cache, const float* x, int64_t n, const int32_t* pos,
                  int64_t n_logits, float* logits, const ForwardHooks* hooks = nullptr,
                  const PrefillHooks* prefill = nullptr) {
    const int64_t E = model.config().n_embd;
    scratch.assign(x, x + n * E);
    model.forward(pool, ws, scratch.data(), n, pos, cache, n_logits, logits, hooks, prefill, exec.interrupt());
}

// ------------------------------------------------------------------ a plain KV cache (the session's)

class CpuContext final : public LlmContext {
  public:
    CpuContext(const LlmExecutor& exec, const LlmModel& model, ThreadPool& pool, Workspace& ws, DType kv_type,
               int64_t n_ctx)
        : exec_(exec), model_(model), pool_(pool), ws_(ws) {
        const LlmConfig& c = model.config();
        cache_.reset(new KVCache(kv_type, c.n_layer, c.n_head_kv, c.head_dim, n_ctx));
    }
    void forward(const float* x, int64_t n, const int32_t* pos, int64_t n_logits, float* logits) override {
        forward_rows(exec_, model_, pool_, ws_, x_, *cache_, x, n, pos, n_logits, logits);
    }
    int64_t size() const override { return cache_->size(); }
    void truncate(int64_t n) override { cache_->truncate(n); }
    size_t kv_bytes() const override { return cache_->tail_bytes(); }

  private:
    const LlmExecutor& exec_;  // its interrupt()
    const LlmModel& model_;
    ThreadPool& pool_;
    Workspace& ws_;
    std::unique_ptr<KVCache> cache_;
    std::vector<float> x_;  // [n_batch, n_embd] the rows being forwarded
};

// ------------------------------------------------------------------ the X²L prefill's forward

class CpuPrefill final : public PrefillRunner {
  public:
    CpuPrefill(const LlmExecutor& exec, const LlmModel& model, ThreadPool& pool, Workspace& ws, int64_t n_batch)
        : exec_(exec), model_(model), pool_(pool), ws_(ws), n_batch_(n_batch) {}

    void run(const PrefillLevel& level, KVCache& work) override {
        const LlmConfig& c = model_.config();
        const int64_t E = c.n_embd, n = level.n;
        std::vector<const KVSegment*> prefix;
        for (const PrefixRows& p : level.prefix) prefix.push_back(p.rows);
        work.set_prefix(prefix);
        work.clear();
        PrefillHooks hooks;
        if (level.votes) {
            level.votes->assign(static_cast<size_t>(c.n_layer) * c.n_head_kv * n, 0.0f);
            hooks.votes.out = level.votes->data();
            hooks.votes.begin = work.n_prefix();
            hooks.votes.end = work.n_prefix() + n;
            hooks.votes.max = level.votes_max;
        }
        std::vector<int32_t> pos;  // [n_pos_axes, m]: the same position on every axis
        for (int64_t b = 0; b < n; b += n_batch_) {
            const int64_t m = std::min(n_batch_, n - b);
            pos.resize(m * c.n_pos_axes);
            for (int64_t i = 0; i < m * c.n_pos_axes; ++i) {
                pos[i] = level.pos ? level.pos[(i / m) * n + b + i % m] : level.pos0 + static_cast<int32_t>(b + i % m);
            }
            hooks.votes.from = std::max<int64_t>(0, level.obs_start - b);
            hooks.vst_rows = level.vst ? level.vst + b : nullptr;
            forward_rows(exec_, model_, pool_, ws_, x_, work, level.x + b * E, m, pos.data(), 0, nullptr, nullptr, &hooks);
        }
    }

  private:
    const LlmExecutor& exec_;  // its interrupt()
    const LlmModel& model_;
    ThreadPool& pool_;
    Workspace& ws_;
    int64_t n_batch_;
    std::vector<float> x_;
};

// ------------------------------------------------------------------ the X²L decoder's mixed cache

class CpuMixedCache final : public MixedCache {
  public:
    CpuMixedCache(const LlmExecutor& exec, const LlmModel& model, ThreadPool& pool, Workspace& ws,
                  const SessionOptions& opt, const TieredRows& rows, int64_t max_tail)
        : exec_(exec), model_(model), pool_(pool), ws_(ws), n_batch_(opt.n_batch), rows_(rows) {
        const LlmConfig& c = model.config();
        cache_.reset(new KVCache(opt.kv_type, c.n_layer, c.n_head_kv, c.head_dim, max_tail));
        compact_only_.push_back(rows.sink);
        compact_only_.insert(compact_only_.end(), rows.compact.begin(), rows.compact.end());
    }

    // Every chunk whose full rows are chosen, or whose keys move, is copied into the working set (keys
    // re-rotated on the way); the others are read where they are.
    void prepare(const MixedCacheLayout& layout) override {
        reloader_.wait_all();
        const size_t n = rows_.compact.size();
        std::vector<const KVSegment*> src;
        std::vector<int32_t> delta;
        std::vector<int> slot(n, -1);
        for (size_t c = 0; c < n; ++c) {
            if (layout.full[c] || layout.delta[c] != 0) {
                slot[c] = static_cast<int>(src.size());
                src.push_back(layout.full[c] ? rows_.full[c] : rows_.compact[c]);
                delta.push_back(layout.delta[c]);
            }
        }
        std::vector<const KVSegment*> work = reloader_.start(src, delta, model_.rope_spec());
        std::vector<const KVSegment*> prefix{rows_.sink};
        for (size_t c = 0; c < n; ++c) prefix.push_back(slot[c] >= 0 ? work[slot[c]] : rows_.compact[c]);
        cache_->set_prefix(prefix);
        cache_->clear();
        full_ = layout.full;
        reload_pending_ = !src.empty();
    }

    void forward(const float* x, int64_t n, const int32_t* pos, int64_t n_logits, float* logits) override {
        ForwardHooks hooks;
        if (reload_pending_) hooks.before_attention = [this](int layer) { reloader_.wait_layer(layer); };
        forward_rows(exec_, model_, pool_, ws_, x_, *cache_, x, n, pos, n_logits, logits, reload_pending_ ? &hooks : nullptr);
        if (reload_pending_) {
            reloader_.wait_all();
            reload_pending_ = false;
        }
    }

    // One forward over the compact-only cache; batch indices are question indices.
    std::vector<float> question_queries(const float* x, int64_t n, const int32_t* pos) override {
        const LlmConfig& c = model_.config();
        reloader_.wait_all();
        cache_->set_prefix(compact_only_);
        cache_->clear();
        full_.assign(rows_.compact.size(), 0);
        const int64_t QD = static_cast<int64_t>(c.n_head) * c.head_dim;
        std::vector<float> q_tok(static_cast<size_t>(c.n_layer) * n * QD, 0.0f);  // [n_layer, n, QD]
        std::vector<float> logits(static_cast<size_t>(c.n_vocab));
        // n_batch rows per forward, each after the ones before it (causal, as one forward would be).
        std::vector<int32_t> batch_pos;  // [n_pos_axes, m]
        for (int64_t b = 0; b < n; b += n_batch_) {
            const int64_t m = std::min(n_batch_, n - b);
            batch_pos.resize(static_cast<size_t>(m) * c.n_pos_axes);
            for (int a = 0; a < c.n_pos_axes; ++a) {
                std::copy(pos + a * n + b, pos + a * n + b + m, batch_pos.data() + a * m);
            }
            ForwardHooks hooks;
            hooks.on_qk = [&](int layer, const float* q, const float*, int64_t rows) {
                std::copy(q, q + rows * QD, q_tok.data() + (static_cast<size_t>(layer) * n + b) * QD);
            };
            forward_rows(exec_, model_, pool_, ws_, x_, *cache_, x + b * c.n_embd, m, batch_pos.data(), 1, logits.data(),
                         &hooks);
        }
        cache_->clear();
        return q_tok;
    }

    int64_t size() const override { return cache_->tail().size(); }
    void truncate(int64_t n) override { cache_->truncate(cache_->n_prefix() + std::min(n, cache_->tail().size())); }
    size_t kv_bytes() const override { return cache_->tail_bytes(); }
    void wait_reload() override {
        reloader_.wait_all();
        reload_pending_ = false;
    }
    const ReloadStats& reload_stats() const override { return reloader_.stats(); }
    size_t working_bytes() const override { return reloader_.working_bytes(); }
    size_t resident_bytes() const override {
        size_t b = rows_.sink->used_bytes();
        for (size_t c = 0; c < rows_.compact.size(); ++c) {
            // a chosen chunk's full rows are held as their reloaded copy in the working set
            b += (c < full_.size() && full_[c] ? rows_.full[c] : rows_.compact[c])->used_bytes();
        }
        return b + cache_->tail().nbytes();
    }
    const std::vector<const KVSegment*>& host_prefix() const override { return cache_->prefix(); }

  private:
    const LlmExecutor& exec_;  // its interrupt()
    const LlmModel& model_;
    ThreadPool& pool_;
    Workspace& ws_;
    int64_t n_batch_;
    TieredRows rows_;
    std::vector<const KVSegment*> compact_only_;  // sink + every chunk's compact rows
    std::unique_ptr<KVCache> cache_;
    Reloader reloader_;
    bool reload_pending_ = false;
    std::vector<char> full_;  // the current layout's choice per chunk
    std::vector<float> x_;
};

}  // namespace

CpuLlmExecutor::CpuLlmExecutor(const LlmModel& model, ThreadPool& pool, const SessionOptions& opt)
    : model_(model), pool_(pool), opt_(opt) {}

std::unique_ptr<LlmContext> CpuLlmExecutor::new_context(int64_t n_ctx) {
    return std::unique_ptr<LlmContext>(new CpuContext(*this, model_, pool_, ws_, opt_.kv_type, n_ctx));
}

std::unique_ptr<PrefillRunner> CpuLlmExecutor::new_prefill(int64_t) {
    return std::unique_ptr<PrefillRunner>(new CpuPrefill(*this, model_, pool_, ws_, opt_.n_batch));
}

std::unique_ptr<MixedCache> CpuLlmExecutor::new_mixed_cache(const TieredRows& rows, const MixedCacheLayout&,
                                                            int64_t max_tail, std::string&) {
    return std::unique_ptr<MixedCache>(new CpuMixedCache(*this, model_, pool_, ws_, opt_, rows, max_tail));
}

}  // namespace x2l
