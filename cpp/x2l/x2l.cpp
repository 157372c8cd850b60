#include "x2l/x2l.h"

#ifdef X2L_HAVE_CUDA
#include "cuda/llm.h"
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/common.h"
#include "x2l/compress.h"

namespace x2l {

namespace {

bool tier_type_ok(DType t) {
    return t == DType::F32 || t == DType::F16 || t == DType::Q8_0 || t == DType::Q4_0;
}

// Positions [start, start + n).
std::vector<int32_t> iota_pos(int32_t start, int64_t n) {
    std::vector<int32_t> p(n);
    std::iota(p.begin(), p.end(), start);
    return p;
}

}  // namespace

// ---------------------------------------------------------------------------------------- prefill

X2LPrefill::X2LPrefill(LlmSession& s, const X2LOptions& o) : s_(s), o_(o) {
    o_.work_type = s.options().kv_type;
    if (o.ratio_low < 1 || o.ratio_high < 1) throw Error("compression ratios must be >= 1");
    if (o.ratio_low > o.ratio_high) throw Error("ratio_low must not exceed ratio_high");
    if (!tier_type_ok(o.low_type) || !tier_type_ok(o.high_type) || !tier_type_ok(o.work_type)) {
        throw Error("KV tier types must be f32, f16, q8_0 or q4_0");
    }
    if (o.obs_window < 0 || o.pool_kernel < 1) throw Error("obs_window must be >= 0 and pool_kernel >= 1");
    const LlmConfig& c = s.model().config();
    ix_.reset(new VideoIndex(c.n_layer, c.n_head_kv, c.head_dim, c.n_embd));
    ix_->ratio_low = o.ratio_low;
    ix_->ratio_high = o.ratio_high;
    ix_->pin_ends = o.pin_ends;
    ix_->two_pass = o.two_pass;
    if (o.compressor != "snapkv" && o.compressor != "beacon") {
        throw Error("compressor must be 'snapkv' or 'beacon' (got '" + o.compressor + "')");
    }
    if (o.compressor == "beacon") {
        if (!s.model().has_beacon()) {
            throw Error("compressor 'beacon' needs a model with beacon (VST) weights, e.g. a converted Video-XL");
        }
        if (!o.two_pass) throw Error("beacon compression runs one pass per level: use two_pass=True");
    }
    ix_->compressor = o.compressor;
    ix_->dense_positions = o.compressor == "beacon";
    ix_->model_fingerprint = s.model().fingerprint();
    ix_->sink.reset(new KVSegment(o.low_type, c.n_layer, c.n_head_kv, c.head_dim, 0));
#ifdef X2L_HAVE_CUDA
    if (s.cuda()) {
        gpu_.reset(new CudaPrefill(*s.cuda(), s.options().n_batch, o.prefill_low_cache_bytes));
        on_device_ = true;
    }
#endif
}

void CudaPrefillDeleter::operator()(CudaPrefill* p) const {
#ifdef X2L_HAVE_CUDA
    delete p;
#else
    (void)p;  // never created without the CUDA backend
#endif
}

// The device prefill's memory and copy figures, so far.
void X2LPrefill::note_device_stats() {
#ifdef X2L_HAVE_CUDA
    if (gpu_) {
        stats_.device_peak_bytes = std::max(stats_.device_peak_bytes, gpu_->peak_device_bytes());
        stats_.streamed_bytes = gpu_->streamed_bytes();
        stats_.fetched_bytes = gpu_->fetched_bytes();
        stats_.cached_low_bytes = std::max(stats_.cached_low_bytes, gpu_->cached_low_bytes());
    }
#endif
}

// Keeps the device prefill's figures and frees what it holds (its page-locked L rows included, which
// the decoder's CudaX2L registers again).
void X2LPrefill::release_device() {
    note_device_stats();
    gpu_.reset();
}

void X2LPrefill::ensure_cache(int64_t n) {
    const LlmConfig& c = s_.model().config();
    int64_t want = std::max(n, o_.max_chunk_tokens);
    if (!cache_ || cache_->tail().capacity() < want) {
        cache_.reset(new KVCache(o_.work_type, c.n_layer, c.n_head_kv, c.head_dim, want));
    }
}

void X2LPrefill::add_sink(const std::vector<int32_t>& tokens) {
    if (!ix_) throw Error("prefill already finished");
    if (!ix_->chunks.empty() || ix_->sink->size() > 0) throw Error("the sink must be added once, before any chunk");
    if (tokens.empty()) return;
    const int64_t n = static_cast<int64_t>(tokens.size());
    const LlmConfig& c = s_.model().config();
    std::vector<float> embd(static_cast<size_t>(n) * c.n_embd);  // [n, n_embd]
    s_.model().embed(tokens.data(), n, embd.data());
    run_level(embd.data(), n, 0, {}, false, nullptr, nullptr);  // on the device when there is one; counts the forward
    std::vector<int32_t> keep(static_cast<size_t>(c.n_layer) * c.n_head_kv * n);
    for (size_t i = 0; i < keep.size(); ++i) keep[i] = static_cast<int32_t>(i % n);
    ix_->sink = gather_segment(cache_->tail(), 0, keep, n, o_.low_type);
    ix_->sink_tokens = tokens;
    ix_->next_pos = static_cast<int32_t>(n);
    n_input_ = n;
    stats_.input_tokens += n;
    cache_->clear();
}

void X2LPrefill::add_chunk_tokens(const std::vector<int32_t>& tokens, int n_frames, bool is_last) {
    const LlmConfig& c = s_.model().config();
    std::vector<float> embd(tokens.size() * static_cast<size_t>(c.n_embd));
    s_.model().embed(tokens.data(), static_cast<int64_t>(tokens.size()), embd.data());
    add_chunk_embd(embd.data(), static_cast<int64_t>(tokens.size()), n_frames, is_last);
}

void X2LPrefill::run_level(const float* embd, int64_t n, int32_t pos0, const std::vector<const KVSegment*>& prefix,
                           bool low_tier, std::vector<float>* importance, const uint8_t* vst,
                           const std::vector<int32_t>* keep) {
    const LlmConfig& c = s_.model().config();
    const int64_t E = c.n_embd;
    ensure_cache(n);
    cache_->set_prefix(prefix);
    cache_->clear();
    const int64_t obs_start = o_.obs_window > 0 ? std::max<int64_t>(0, n - o_.obs_window) : 0;
    bool done = false;
#ifdef X2L_HAVE_CUDA
    if (gpu_) {
        std::vector<CudaPrefill::PrefixSegment> segs;
        for (size_t i = 0; i < prefix.size(); ++i) segs.push_back({prefix[i], low_tier && i > 0});
        try {
            gpu_->run(embd, n, pos0, segs, obs_start, cache_->tail(), importance, vst, keep);
            done = true;
            stats_.device_forward_tokens += n;
            note_device_stats();
        } catch (const BudgetError& e) {
            // The device is full (the H tier grows with every chunk): go on on the CPU, which needs
            // nothing from the device (the index lives on the host).
            release_device();
            on_device_ = false;
            device_note_ = std::string("the prefill does not fit the device (") + e.what() + "); continuing on the CPU";
            cache_->clear();
        }
    }
#endif
    if (!done) {
        ForwardHooks hooks;
        if (importance) {
            importance->assign(static_cast<size_t>(c.n_layer) * c.n_head_kv * n, 0.0f);
            hooks.obs = importance->data();
            hooks.obs_begin = cache_->n_prefix();
            hooks.obs_end = cache_->n_prefix() + n;
        }
        const int64_t n_batch = s_.options().n_batch;
        for (int64_t b = 0; b < n; b += n_batch) {
            const int64_t m = std::min(n_batch, n - b);
            x_.assign(embd + b * E, embd + (b + m) * E);
            std::vector<int32_t> pos = iota_pos(pos0 + static_cast<int32_t>(b), m);
            hooks.obs_from = std::max<int64_t>(0, obs_start - b);
            hooks.vst_rows = vst ? vst + b : nullptr;
            s_.model().forward(s_.pool(), s_.workspace(), x_.data(), m, pos.data(), *cache_, 0, nullptr, &hooks);
        }
    }
    stats_.forward_tokens += n;
    if (importance) {
        // Votes per query that could see the entry: entry e is visible to the queries at or after it.
        for (size_t lh = 0; lh < static_cast<size_t>(c.n_layer) * c.n_head_kv; ++lh) {
            float* imp = importance->data() + lh * n;
            for (int64_t e = 0; e < n; ++e) imp[e] /= static_cast<float>(n - std::max(e, obs_start));
        }
    }
}

// Video-XL: X' = the chunk with one VST after every `ratio` raw tokens, run on top of the sink and
// the earlier VSTs of the same level at dense positions; only the VST rows' K/V are kept.
void X2LPrefill::add_chunk_beacon(ChunkKV& ch, const float* embd, int64_t n, bool pinned) {
    const LlmConfig& c = s_.model().config();
    const int64_t E = c.n_embd;
    const std::vector<float>& vst_embd = s_.model().vst_embedding();
    for (int level = 0; level < 2; ++level) {
        const int ratio = (level == 0 || pinned) ? o_.ratio_low : o_.ratio_high;
        const int64_t m = n / ratio;
        std::vector<float> rows;
        std::vector<uint8_t> vst;
        rows.reserve(static_cast<size_t>(n + m) * E);
        for (int64_t t = 0; t < n; ++t) {
            rows.insert(rows.end(), embd + t * E, embd + (t + 1) * E);
            vst.push_back(0);
            if ((t + 1) % ratio == 0 && (t + 1) / ratio <= m) {
                rows.insert(rows.end(), vst_embd.begin(), vst_embd.end());
                vst.push_back(1);
            }
        }
        const int64_t total = static_cast<int64_t>(vst.size());
        std::vector<const KVSegment*> prefix{ix_->sink.get()};
        int32_t pos0 = static_cast<int32_t>(ix_->sink->size());
        for (const auto& p : ix_->chunks) {
            const KVSegment* seg = level == 0 ? p.low.get() : p.high.get();
            prefix.push_back(seg);
            pos0 += static_cast<int32_t>(seg->size());
        }
        std::vector<int32_t> vst_idx;
        for (int64_t i = 0; i < total; ++i) {
            if (vst[i]) vst_idx.push_back(static_cast<int32_t>(i));
        }
        run_level(rows.data(), total, pos0, prefix, level == 0, nullptr, vst.data(), &vst_idx);
        const int64_t kept = static_cast<int64_t>(vst_idx.size());
        // As memory, the kept VSTs are numbered densely after what precedes them (Video-XL re-applies
        // RoPE over the compacted cache): move each from its slot in X' to pos0 + its rank.
        const RopeSpec spec = s_.model().rope_spec();
        for (int64_t j = 0; j < kept; ++j) cache_->tail().move_entry(vst_idx[j], pos0 + static_cast<int32_t>(j), spec);
        std::vector<int32_t> keep;  // the same rows for every layer and head
        keep.reserve(static_cast<size_t>(c.n_layer) * c.n_head_kv * kept);
        for (int i = 0; i < c.n_layer * c.n_head_kv; ++i) keep.insert(keep.end(), vst_idx.begin(), vst_idx.end());
        auto seg = gather_segment(cache_->tail(), 0, keep, kept, level == 0 ? o_.low_type : o_.high_type);
        (level == 0 ? ch.low : ch.high) = std::move(seg);
    }
    cache_->clear();
}

void X2LPrefill::add_chunk_embd(const float* embd, int64_t n, int n_frames, bool is_last) {
    if (!ix_) throw Error("prefill already finished");
    if (done_last_) throw Error("a chunk was added after the one marked last");
    if (n <= 0) throw Error("empty chunk");
    if (n_frames < 1 || n_frames > n) throw Error("n_frames must be in [1, chunk tokens]");
    auto t0 = std::chrono::steady_clock::now();
    const LlmConfig& c = s_.model().config();
    const int64_t E = c.n_embd;
    const size_t i = ix_->chunks.size();
    const bool pinned = o_.pin_ends && (i == 0 || is_last);

    ChunkKV ch;
    ch.tok_begin = n_input_;
    ch.tok_end = n_input_ + n;
    ch.pos_begin = ix_->next_pos;
    ch.pos_end = ix_->next_pos + static_cast<int32_t>(n);
    ch.n_frames = n_frames;
    ch.emb_sig.assign(static_cast<size_t>(n_frames) * E, 0.0f);
    for (int f = 0; f < n_frames; ++f) {
        int64_t a = f * n / n_frames, b = (f + 1) * n / n_frames;
        float* dst = ch.emb_sig.data() + static_cast<size_t>(f) * E;
        for (int64_t t = a; t < b; ++t) {
            for (int64_t k = 0; k < E; ++k) dst[k] += embd[t * E + k];
        }
        for (int64_t k = 0; k < E; ++k) dst[k] /= static_cast<float>(b - a);
    }

    if (o_.compressor == "beacon") {
        if (n < o_.ratio_low) throw Error("chunk shorter than ratio_low: nothing to summarise");
        add_chunk_beacon(ch, embd, n, pinned);
    } else {
        add_chunk_snapkv(ch, embd, n, pinned);
    }
    if (ch.key_sig.empty()) {  // beacon: from the chunk's L entries (VST rows)
        ch.key_sig = distinct_pre_rope_keys(*ch.low, ch.low->size(), [&](int l, int h, int64_t e) { return ch.low_row_pos(l, h, e); },
                                            s_.model().rope_spec(), kKeySignatureEntries);
    }
    ix_->chunks.push_back(std::move(ch));
    ix_->next_pos += static_cast<int32_t>(n);
    n_input_ += n;
    stats_.input_tokens += n;
    done_last_ = is_last;
    stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    check_budget();
}

// Training-free: run the chunk in full, then keep per layer/KV head the entries its queries voted for.
void X2LPrefill::add_chunk_snapkv(ChunkKV& ch, const float* embd, int64_t n, bool pinned) {
    const LlmConfig& c = s_.model().config();
    std::vector<const KVSegment*> low_prefix{ix_->sink.get()}, high_prefix{ix_->sink.get()};
    for (const auto& p : ix_->chunks) {
        low_prefix.push_back(p.low.get());
        high_prefix.push_back(p.high.get());
    }
    const int64_t m_low = std::max<int64_t>(1, n / o_.ratio_low);
    const int64_t m_high = std::max<int64_t>(1, n / (pinned ? o_.ratio_low : o_.ratio_high));
    std::vector<float> importance;
    // L level: the chunk on top of the sink and the earlier chunks' L-KVs.
    run_level(embd, n, ix_->next_pos, low_prefix, true, &importance, nullptr);
    const KVSegment& full = cache_->tail();  // the chunk's uncompressed KV
    ch.key_sig = distinct_pre_rope_keys(full, n, [&](int, int, int64_t e) { return full.pos(e); }, s_.model().rope_spec(),
                                        kKeySignatureEntries);
    auto keep = select_entries(importance.data(), c.n_layer, c.n_head_kv, n, m_low, o_.pool_kernel);
    ch.low = gather_segment(cache_->tail(), 0, keep, m_low, o_.low_type);
    ch.low_pos.resize(keep.size());
    for (size_t i = 0; i < keep.size(); ++i) ch.low_pos[i] = cache_->tail().pos(keep[i]);
    if (o_.two_pass) {
        // H level, as the official code: the chunk on top of the sink and the earlier H-KVs.
        run_level(embd, n, ix_->next_pos, high_prefix, false, &importance, nullptr);
    }
    keep = select_entries(importance.data(), c.n_layer, c.n_head_kv, n, m_high, o_.pool_kernel);
    ch.high = gather_segment(cache_->tail(), 0, keep, m_high, o_.high_type);
    cache_->clear();
}

void X2LPrefill::check_budget() const {
    TierBytes b = ix_->bytes();
    if (o_.max_host_bytes && b.low > o_.max_host_bytes) {
        throw BudgetError("L-KV tier needs " + std::to_string(b.low) + " bytes, over max_host_bytes=" +
                          std::to_string(o_.max_host_bytes));
    }
    size_t dev = b.sink + b.high + working_bytes();
    if (o_.max_device_bytes && dev > o_.max_device_bytes) {
        throw BudgetError("sink + H-KV tier + working buffers need " + std::to_string(dev) +
                          " bytes, over max_device_bytes=" + std::to_string(o_.max_device_bytes));
    }
}

std::unique_ptr<VideoIndex> X2LPrefill::finish() {
    if (!ix_) throw Error("prefill already finished");
    if (ix_->chunks.empty()) throw Error("nothing was prefilled: no chunks");
    cache_.reset();
    release_device();
    return std::move(ix_);
}

// ---------------------------------------------------------------------------------------- decode

X2LDecoder::X2LDecoder(LlmSession& s, const VideoIndex& ix, int64_t max_tail_tokens) : s_(s), ix_(ix) {
    const LlmConfig& c = s.model().config();
    if (ix.n_layer != c.n_layer || ix.n_head_kv != c.n_head_kv || ix.head_dim != c.head_dim || ix.n_embd != c.n_embd) {
        throw Error("this video index was built with a different model");
    }
    if (ix.model_fingerprint != s.model().fingerprint()) {
        throw Error("this video index was built with a different model (same dimensions, other weights): "
                    "index the video again with this model");
    }
    for (int32_t id : ix.sink_tokens) {
        if (id >= c.n_vocab) throw FormatError("the video index's sink holds a token id beyond this model's vocabulary");
    }
    ix.check_file();
    if (max_tail_tokens <= 0) throw Error("max_tail_tokens must be > 0");
    cache_.reset(new KVCache(s.options().kv_type, c.n_layer, c.n_head_kv, c.head_dim, max_tail_tokens));
#ifdef X2L_HAVE_CUDA
    if (s.cuda()) {
        try {
            gpu_.reset(new CudaX2L(*s.cuda(), ix, max_tail_tokens, s.options().n_batch));
            gpu_->tail().set_graphs(s.options().cuda_graphs);
        } catch (const BudgetError& e) {
            // Device or pinned memory too small for this index: answer on the CPU instead.
            device_note_ = std::string("the index does not fit the device (") + e.what() + "); decoding on the CPU";
        }
    }
#endif
    prepare({});
}

void CudaX2LDeleter::operator()(CudaX2L* p) const {
#ifdef X2L_HAVE_CUDA
    delete p;
#else
    (void)p;  // never created without the CUDA backend
#endif
}

CudaGraphStats X2LDecoder::graph_stats() const {
#ifdef X2L_HAVE_CUDA
    if (gpu_) return gpu_->tail().graph_stats();
#endif
    return CudaGraphStats();
}

void X2LDecoder::wait_reload() {
#ifdef X2L_HAVE_CUDA
    if (gpu_) gpu_->wait_reload();
#endif
    reloader_.wait_all();
    reload_pending_ = false;
}

const ReloadStats& X2LDecoder::reload_stats() const {
#ifdef X2L_HAVE_CUDA
    if (gpu_) return gpu_->stats();
#endif
    return reloader_.stats();
}

size_t X2LDecoder::working_bytes() const {
#ifdef X2L_HAVE_CUDA
    if (gpu_) return gpu_->working_bytes();
#endif
    return reloader_.working_bytes();
}

void X2LDecoder::set_prefix(const std::vector<const KVSegment*>& prefix) {
    cache_->set_prefix(prefix);
    cache_->clear();
    history_.clear();
}

std::vector<float> X2LDecoder::scores(const std::vector<int32_t>& question, Scorer scorer, int64_t content_begin,
                                      int64_t content_end) {
    const LlmConfig& c = s_.model().config();
    const int64_t nq = static_cast<int64_t>(question.size());
    if (nq == 0) throw Error("the question is empty");
    if (content_end <= 0) content_end += nq;
    if (content_begin < 0 || content_begin >= content_end || content_end > nq) throw Error("bad question content range");
    const int64_t n_content = content_end - content_begin;
    if (scorer == Scorer::Attention) {
        for (size_t ch = 0; ch < ix_.chunks.size(); ++ch) ix_.check_low(ch);  // mapped indexes: file unchanged, rows verified
    }
    if (scorer == Scorer::Embedding) {
        std::vector<float> q(static_cast<size_t>(n_content) * c.n_embd);
        s_.model().embed(question.data() + content_begin, n_content, q.data());
        return score_embedding(ix_, q.data(), n_content);
    }
    // One question pass over the H-only cache gives the question's pre-RoPE queries per layer (the
    // tokens see the video only through H, which is what this question would see without reload).
    // The template tokens after the content vote too: they set each chunk's typical mass (the median),
    // against which the content tokens' peak is measured.
    reloader_.wait_all();
    set_prefix(high_prefix());
    if (nq > cache_->tail().capacity()) throw BudgetError("question too long");
    const int64_t QD = static_cast<int64_t>(c.n_head) * c.head_dim;
    std::vector<float> q_tok;  // [n_layer, nq, QD]
#ifdef X2L_HAVE_CUDA
    if (gpu_) q_tok = gpu_->question_queries(s_.model(), question);  // the question pass on the device
#endif
    if (q_tok.empty()) {
        if (nq > s_.options().n_batch) throw BudgetError("question longer than n_batch tokens");
        q_tok.assign(static_cast<size_t>(c.n_layer) * nq * QD, 0.0f);
        ForwardHooks hooks;
        hooks.on_qk = [&](int layer, const float* q, const float*, int64_t m) {
            // One forward call for the whole question, so batch indices are question indices.
            std::copy(q, q + m * QD, q_tok.data() + static_cast<size_t>(layer) * nq * QD);
        };
        std::vector<float> logits;
        run_tokens(s_.model(), s_.pool(), s_.workspace(), *cache_, question, question_pos(), s_.options().n_batch,
                   logits, nullptr, &hooks);
        cache_->clear();
    }
    std::vector<float> out =
        scorer == Scorer::Keys
            ? score_keys(ix_, q_tok.data(), nq, content_begin, content_end, c.n_head, s_.pool())
            : score_attention(ix_, q_tok.data(), nq, content_begin, content_end, c.n_head, s_.model().rope_spec(), s_.pool());
    prepare(selected_);  // restore the mixed cache of the current selection
    return out;
}

void X2LDecoder::prepare(const std::vector<int>& selected) {
    const int n = static_cast<int>(ix_.chunks.size());
    std::vector<int> sel = selected;
    std::sort(sel.begin(), sel.end());
    if (std::adjacent_find(sel.begin(), sel.end()) != sel.end()) throw Error("selection has duplicate chunks");
    for (int c : sel) {
        if (c < 0 || c >= n) throw Error("chunk index " + std::to_string(c) + " out of range [0, " + std::to_string(n) + ")");
    }
    for (int c : sel) ix_.check_low(static_cast<size_t>(c));  // mapped indexes: file unchanged, rows verified
    reloader_.wait_all();
#ifdef X2L_HAVE_CUDA
    if (gpu_) {
        // The CPU cache keeps the H-only prefix the scorers read; the answer runs on the device.
        selected_.clear();
        set_prefix(high_prefix());  // clears the history, as the device tail is cleared below
        gpu_->prepare(sel);      // on failure: H-only on the device, nothing selected
        selected_ = sel;
        return;
    }
#endif
    // Every selected chunk is copied (its L-KVs into the working set). With dense positions
    // (beacon), a chunk whose place in the mixed cache moved is re-rotated on the way, H or L.
    std::vector<const KVSegment*> src;
    std::vector<int32_t> delta;
    std::vector<int> slot(n, -1);
    int32_t next = static_cast<int32_t>(ix_.sink->size());
    size_t k = 0;
    for (int c = 0; c < n; ++c) {
        const bool chosen = k < sel.size() && sel[k] == c;
        if (chosen) ++k;
        const KVSegment* seg = chosen ? ix_.chunks[c].low.get() : ix_.chunks[c].high.get();
        const int32_t d = (ix_.dense_positions && seg->size() > 0) ? next - seg->pos(0) : 0;
        if (chosen || d != 0) {
            slot[c] = static_cast<int>(src.size());
            src.push_back(seg);
            delta.push_back(d);
        }
        next += static_cast<int32_t>(seg->size());
    }
    const RopeSpec spec = s_.model().rope_spec();
    std::vector<const KVSegment*> work = reloader_.start(src, delta, spec);
    std::vector<const KVSegment*> prefix{ix_.sink.get()};
    for (int c = 0; c < n; ++c) prefix.push_back(slot[c] >= 0 ? work[slot[c]] : ix_.chunks[c].high.get());
    set_prefix(prefix);
    selected_ = sel;
    reload_pending_ = !src.empty();
}

std::vector<const KVSegment*> X2LDecoder::high_prefix() const {
    std::vector<const KVSegment*> prefix{ix_.sink.get()};
    for (const auto& ch : ix_.chunks) prefix.push_back(ch.high.get());
    return prefix;
}

int32_t X2LDecoder::question_pos() const {
    return ix_.dense_positions ? static_cast<int32_t>(cache_->n_prefix()) : ix_.next_pos;
}

void X2LDecoder::eval(const std::vector<int32_t>& tokens, std::vector<float>* all_out) {
    if (tokens.empty()) return;
    ix_.check_file();  // mapped indexes: the reload and (Jetson) the device read the file's pages
    if (n_past() + static_cast<int64_t>(tokens.size()) > n_ctx()) {
        throw BudgetError("question/answer budget of " + std::to_string(n_ctx()) + " tokens exceeded");
    }
#ifdef X2L_HAVE_CUDA
    if (gpu_) {
        gpu_->tail().eval_tokens(s_.model(), tokens, last_logits_, all_out);
        gpu_->wait_reload();  // already landed (every layer waited for it); records the copy time
        history_.insert(history_.end(), tokens.begin(), tokens.end());
        return;
    }
#endif
    ForwardHooks hooks;
    if (reload_pending_) hooks.before_attention = [this](int layer) { reloader_.wait_layer(layer); };
    run_tokens(s_.model(), s_.pool(), s_.workspace(), *cache_, tokens, question_pos() + static_cast<int32_t>(n_past()),
               s_.options().n_batch, last_logits_, all_out, reload_pending_ ? &hooks : nullptr);
    if (reload_pending_) {
        reloader_.wait_all();
        reload_pending_ = false;
    }
    history_.insert(history_.end(), tokens.begin(), tokens.end());
}

int32_t X2LDecoder::sample(Sampler& sampler) {
    if (last_logits_.empty()) throw Error("nothing evaluated yet");
    std::vector<float> logits = last_logits_;
    return sampler.sample(logits.data(), static_cast<int32_t>(logits.size()), history_.data(), n_past());
}

void X2LDecoder::truncate(int64_t n) {
    if (n < 0 || n > n_past()) throw Error("truncate: n out of range");
#ifdef X2L_HAVE_CUDA
    if (gpu_) gpu_->tail().truncate(n);
#endif
    cache_->truncate(cache_->n_prefix() + std::min(n, cache_->tail().size()));
    history_.resize(static_cast<size_t>(n));
}

size_t X2LDecoder::resident_bytes() const {
#ifdef X2L_HAVE_CUDA
    if (gpu_) return gpu_->resident_bytes();
#endif
    size_t b = ix_.sink->used_bytes();
    size_t k = 0;
    for (size_t c = 0; c < ix_.chunks.size(); ++c) {
        if (k < selected_.size() && selected_[k] == static_cast<int>(c)) {
            b += ix_.chunks[c].low->used_bytes();  // its reloaded copy in the working set
            ++k;
        } else {
            b += ix_.chunks[c].high->used_bytes();
        }
    }
    return b + cache_->tail().nbytes();
}

}  // namespace x2l
