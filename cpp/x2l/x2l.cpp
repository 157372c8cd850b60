#include "x2l/x2l.h"

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

// Positions [start, start + n) on each of n_axes rows ([n_axes, n]; M-RoPE text sits at (P, P, P)).
std::vector<int32_t> iota_pos(int32_t start, int64_t n, int n_axes = 1) {
    std::vector<int32_t> p(n * n_axes);
    for (int a = 0; a < n_axes; ++a) std::iota(p.begin() + a * n, p.begin() + (a + 1) * n, start);
    return p;
}

PrefillLevel level_rows(const float* x, int64_t n, int32_t pos0, std::vector<PrefixRows> prefix) {
    PrefillLevel level;
    level.x = x;
    level.n = n;
    level.pos0 = pos0;
    level.prefix = std::move(prefix);
    return level;
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
    if (!is_training_free_rule(o.compressor) && o.compressor != "beacon") {
        throw Error("compressor must be 'snapkv', 'kvzip', 'keydiff', 'hybrid' or 'beacon' (got '" + o.compressor + "')");
    }
    if (!o.high_compressor.empty()) {
        if (!is_training_free_rule(o.high_compressor)) {
            throw Error("high_compressor must be '', 'snapkv', 'kvzip', 'keydiff' or 'hybrid' (got '" + o.high_compressor + "')");
        }
        if (o.compressor == "beacon") throw Error("high_compressor is for the training-free compressors (beacon: leave it '')");
        if (!o.two_pass && o.high_compressor != o.compressor) {
            throw Error("a high_compressor other than the compressor needs two passes (two_pass=True)");
        }
    }
    pool_scope_from_name(o.pool_scope);  // throws for an unknown name
    if (o.merge && o.compressor == "beacon") throw Error("merge is for the training-free compressors (beacon keeps VST rows)");
    if (!(o.merge_min_similarity >= 0.0f && o.merge_min_similarity <= 1.0f)) {
        throw Error("merge_min_similarity must be in [0, 1]");
    }
    for (int32_t t : o.repeat_prompt) {
        if (t < 0 || t >= s.model().config().n_vocab) throw Error("repeat_prompt has a token id out of the vocabulary");
    }
    if (o.compressor == "beacon") {
        if (!s.model().has_beacon()) {
            throw Error("compressor 'beacon' needs a model with beacon (VST) weights, e.g. a converted Video-XL");
        }
        if (!o.two_pass) throw Error("beacon compression runs one pass per level: use two_pass=True");
    }
    // Saved in the index: "keydiff", or "keydiff/snapkv" when the H tier has its own rule.
    ix_->compressor = o.compressor;
    if (!o.high_compressor.empty() && o.high_compressor != o.compressor) ix_->compressor += "/" + o.high_compressor;
    if (o.dense_positions && s.model().config().n_pos_axes > 1) {
        throw Error("dense_positions: M-RoPE models keep their 3-D positions (use dense_positions=False)");
    }
    ix_->dense_positions = o.compressor == "beacon" || o.dense_positions;
    ix_->model_fingerprint = s.model().fingerprint();
    ix_->sink.reset(new KVSegment(o.low_type, c.n_layer, c.n_head_kv, c.head_dim, 0));
    runner_ = s.executor().new_prefill(o.prefill_low_cache_bytes);
    on_device_ = runner_->on_device();
}

// The device prefill's memory and copy figures, so far.
void X2LPrefill::note_device_stats() {
    const PrefillDeviceStats d = runner_->device_stats();
    stats_.device_peak_bytes = std::max(stats_.device_peak_bytes, d.peak_bytes);
    stats_.streamed_bytes = d.streamed_bytes;
    stats_.fetched_bytes = d.fetched_bytes;
    stats_.cached_low_bytes = std::max(stats_.cached_low_bytes, d.cached_low_bytes);
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
    run_level(level_rows(embd.data(), n, 0, {}));  // on the device when there is one; counts the forward
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

void X2LPrefill::run_level(PrefillLevel level) {
    const LlmConfig& c = s_.model().config();
    const int64_t n = level.n;
    ensure_cache(n);
    cache_->clear();
    s_.interrupt().check();  // the CPU runner checks again before every layer
    runner_->run(level, *cache_);
    if (runner_->on_device()) stats_.device_forward_tokens += n;
    on_device_ = runner_->on_device();
    device_note_ = runner_->note();
    note_device_stats();
    stats_.forward_tokens += n;
    if (level.votes && !level.votes_max) {
        // Votes per query that could see the entry: entry e is visible to the queries at or after it.
        for (size_t lh = 0; lh < static_cast<size_t>(c.n_layer) * c.n_head_kv; ++lh) {
            float* imp = level.votes->data() + lh * n;
            for (int64_t e = 0; e < n; ++e) imp[e] /= static_cast<float>(n - std::max(e, level.obs_start));
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
        LevelPlan plan = plan_level(*ix_, level);  // the sink and the earlier VSTs of this level, densely
        const int32_t pos0 = plan.dense_pos;
        std::vector<int32_t> vst_idx;
        for (int64_t i = 0; i < total; ++i) {
            if (vst[i]) vst_idx.push_back(static_cast<int32_t>(i));
        }
        PrefillLevel run = level_rows(rows.data(), total, pos0, std::move(plan.prefix));
        run.vst = vst.data();
        run.keep = &vst_idx;
        run_level(std::move(run));
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

void X2LPrefill::set_text_position(int32_t pos) {
    if (!ix_) throw Error("prefill already finished");
    if (s_.model().config().n_pos_axes == 1) throw Error("a text position is only for M-RoPE models");
    if (pos < ix_->sink->size()) throw Error("the text position must follow the sink");
    ix_->text_pos = pos;
}

void X2LPrefill::add_chunk_embd(const float* embd, int64_t n, int n_frames, bool is_last, const int32_t* pos) {
    if (!ix_) throw Error("prefill already finished");
    if (pos && s_.model().config().n_pos_axes == 1) throw Error("explicit chunk positions are only for M-RoPE models");
    if (pos && ix_->dense_positions) throw Error("dense positions number entries densely: no explicit positions");
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
    ch.row_sig = distinct_input_rows(embd, n, static_cast<int>(E), (n + kRowSignatureStride - 1) / kRowSignatureStride);

    if (o_.compressor == "beacon") {
        if (n < o_.ratio_low) throw Error("chunk shorter than ratio_low: nothing to summarise");
        add_chunk_beacon(ch, embd, n, pinned);
    } else {
        add_chunk_training_free(ch, embd, n, pinned, pos);
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

void X2LPrefill::chunk_importance(const float* embd, int64_t n, const int32_t* pos, int level,
                                  std::vector<float>& importance) {
    const LlmConfig& c = s_.model().config();
    const std::string& rule = level == 1 && !o_.high_compressor.empty() ? o_.high_compressor : o_.compressor;
    const LevelPlan plan = plan_level(*ix_, level);  // the sink and the earlier chunks' rows of this level
    // The chunk keeps its tokens' positions, or (dense) follows the entries of the level it attends to.
    const int32_t pos0 = ix_->dense_positions ? plan.dense_pos : ix_->next_pos;
    if (rule == "snapkv" || rule == "hybrid") {
        PrefillLevel run = level_rows(embd, n, pos0, plan.prefix);
        run.pos = pos;
        run.votes = &importance;
        run.obs_start = o_.obs_window > 0 ? std::max<int64_t>(0, n - o_.obs_window) : 0;
        run.votes_max = o_.max_votes;
        run_level(std::move(run));
        if (rule == "hybrid") {
            const std::vector<float> votes = importance_ranks(importance.data(), c.n_layer, c.n_head_kv, n);
            const std::vector<float> distinct = key_distinctiveness(cache_->tail(), n, s_.model().rope_spec());
            const std::vector<float> keys = importance_ranks(distinct.data(), c.n_layer, c.n_head_kv, n);
            for (size_t i = 0; i < importance.size(); ++i) importance[i] = votes[i] + keys[i];
        }
    } else if (rule == "kvzip") {
        if (pos) throw Error("compressor kvzip: M-RoPE positions are not supported yet (use snapkv or keydiff)");
        // [chunk; repeat_prompt; chunk] at consecutive positions: the prompt's and the copy's queries
        // find, layer by layer, what of the original they need to reproduce it. Only the original's rows
        // are kept (and, on a device, fetched); the copy is forgotten.
        const int64_t E = c.n_embd, r = static_cast<int64_t>(o_.repeat_prompt.size()), total = 2 * n + r;
        std::vector<float> rows(static_cast<size_t>(total) * E);  // [2n + r, n_embd]
        std::copy(embd, embd + n * E, rows.begin());
        if (r > 0) s_.model().embed(o_.repeat_prompt.data(), r, rows.data() + n * E);
        std::copy(embd, embd + n * E, rows.begin() + (n + r) * E);
        std::vector<int32_t> original(static_cast<size_t>(n));
        std::iota(original.begin(), original.end(), 0);
        std::vector<float> votes;  // [n_layer][n_head_kv][total]
        PrefillLevel run = level_rows(rows.data(), total, pos0, plan.prefix);
        run.votes = &votes;
        run.obs_start = n;
        run.votes_max = true;
        run.keep = &original;
        run_level(std::move(run));
        importance.resize(static_cast<size_t>(c.n_layer) * c.n_head_kv * n);
        for (size_t lh = 0; lh < static_cast<size_t>(c.n_layer) * c.n_head_kv; ++lh) {
            std::copy_n(votes.data() + lh * total, n, importance.data() + lh * n);
        }
    } else {  // keydiff
        PrefillLevel run = level_rows(embd, n, pos0, plan.prefix);
        run.pos = pos;
        run_level(std::move(run));
        importance = key_distinctiveness(cache_->tail(), n, s_.model().rope_spec());
    }
}

// Training-free: run the chunk in full, then keep per layer/KV head the entries of highest importance.
void X2LPrefill::add_chunk_training_free(ChunkKV& ch, const float* embd, int64_t n, bool pinned,
                                         const int32_t* pos) {
    const LlmConfig& c = s_.model().config();
    const int64_t m_low = std::max<int64_t>(1, n / o_.ratio_low);
    const int64_t m_high = std::max<int64_t>(1, n / (pinned ? o_.ratio_low : o_.ratio_high));
    std::vector<float> importance;
    // L level: the chunk on top of the sink and the earlier chunks' L-KVs.
    const PoolScope scope = pool_scope_from_name(o_.pool_scope);
    chunk_importance(embd, n, pos, 0, importance);
    pool_importance(importance, c.n_layer, c.n_head_kv, n, scope);
    const KVSegment& full = cache_->tail();  // the chunk's uncompressed KV (rows [0, n))
    const RopeSpec rope_spec = s_.model().rope_spec();
    ch.key_sig = distinct_pre_rope_keys(full, n, [&](int, int, int64_t e) { return full.pos(e); }, rope_spec,
                                        kKeySignatureEntries);
    // Dense positions: a tier's rows continue that tier's entries (sink, then the earlier chunks' rows).
    const RopeSpec* dense = ix_->dense_positions ? &rope_spec : nullptr;
    auto tier_base = [&](int level) { return dense ? plan_level(*ix_, level).dense_pos : 0; };
    auto keep = select_entries(importance.data(), c.n_layer, c.n_head_kv, n, m_low, o_.pool_kernel);
    ch.low = gather_segment(cache_->tail(), 0, keep, m_low, o_.low_type, dense, tier_base(0));
    if (o_.merge) merge_dropped_values(cache_->tail(), 0, n, keep, m_low, rope_spec, o_.merge_min_similarity, *ch.low);
    if (!dense) {  // dense rows of every head sit at the same positions: low->pos()
        ch.low_pos.resize(keep.size());
        for (size_t i = 0; i < keep.size(); ++i) ch.low_pos[i] = cache_->tail().pos(keep[i]);
    }
    if (o_.two_pass) {
        // H level, as the official code: the chunk on top of the sink and the earlier H-KVs.
        chunk_importance(embd, n, pos, 1, importance);
        pool_importance(importance, c.n_layer, c.n_head_kv, n, scope);
    }
    keep = select_entries(importance.data(), c.n_layer, c.n_head_kv, n, m_high, o_.pool_kernel);
    ch.high = gather_segment(cache_->tail(), 0, keep, m_high, o_.high_type, dense, tier_base(1));
    if (o_.merge) merge_dropped_values(cache_->tail(), 0, n, keep, m_high, rope_spec, o_.merge_min_similarity, *ch.high);
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

std::unique_ptr<VideoIndex> X2LPrefill::snapshot() const {
    if (!ix_) throw Error("prefill already finished");
    if (ix_->chunks.empty()) throw Error("nothing was prefilled yet: no chunks");
    if (s_.model().config().n_pos_axes > 1 && ix_->text_pos < 0) {
        throw Error("a snapshot of an M-RoPE prefill needs the question's text position (set_text_position)");
    }
    const VideoIndex& x = *ix_;
    std::unique_ptr<VideoIndex> out(new VideoIndex(x.n_layer, x.n_head_kv, x.head_dim, x.n_embd));
    out->ratio_low = x.ratio_low;
    out->ratio_high = x.ratio_high;
    out->pin_ends = x.pin_ends;
    out->two_pass = x.two_pass;
    out->compressor = x.compressor;
    out->dense_positions = x.dense_positions;
    out->next_pos = x.next_pos;
    out->text_pos = x.text_pos;
    out->model_fingerprint = x.model_fingerprint;
    out->sink = x.sink;
    out->sink_tokens = x.sink_tokens;
    out->chunks = x.chunks;  // rows shared, signatures and L positions copied
    return out;
}

std::unique_ptr<VideoIndex> X2LPrefill::finish() {
    if (!ix_) throw Error("prefill already finished");
    if (ix_->chunks.empty()) throw Error("nothing was prefilled: no chunks");
    cache_.reset();
    // Keep the device prefill's figures and free what it holds (its page-locked L rows included, which
    // the decoder registers again).
    note_device_stats();
    runner_.reset();
    return std::move(ix_);
}

// ---------------------------------------------------------------------------------------- decode

X2LDecoder::X2LDecoder(LlmSession& s, const VideoIndex& ix, int64_t max_tail_tokens, int32_t question_gap)
    : s_(s), ix_(ix), max_tail_(max_tail_tokens), question_gap_(question_gap) {
    const LlmConfig& c = s.model().config();
    if (ix.n_layer != c.n_layer || ix.n_head_kv != c.n_head_kv || ix.head_dim != c.head_dim || ix.n_embd != c.n_embd) {
        throw Error("this video index was built with a different model");
    }
    if (ix.model_fingerprint != s.model().fingerprint()) {
        throw Error("this video index was built with a different model (same dimensions, other weights): "
                    "index the video again with this model");
    }
    if (ix.text_pos >= 0 && c.n_pos_axes == 1) {
        throw FormatError("the video index holds an M-RoPE text position but this model has no M-RoPE");
    }
    for (int32_t id : ix.sink_tokens) {
        if (id >= c.n_vocab) throw FormatError("the video index's sink holds a token id beyond this model's vocabulary");
    }
    ix.check_file();
    if (max_tail_tokens <= 0) throw Error("max_tail_tokens must be > 0");
    if (question_gap < 0 || question_gap > kMaxQuestionGap) {
        throw Error("question_gap must be in [0, " + std::to_string(kMaxQuestionGap) + "]");
    }
    compact_only_ = plan_mixed_cache(ix, {}, question_gap_);
    // A device that cannot hold this index gives a CPU cache and says why in device_note_.
    cache_ = s.executor().new_mixed_cache(tiered_rows(ix), compact_only_.layout, max_tail_tokens, device_note_);
    prepare({});
}

std::vector<float> X2LDecoder::scores(const std::vector<int32_t>& question, Scorer scorer, int64_t content_begin,
                                      int64_t content_end) {
    const LlmConfig& c = s_.model().config();
    const int64_t nq = static_cast<int64_t>(question.size());
    if (nq == 0) throw Error("the question is empty");
    if (content_end <= 0) content_end += nq;
    if (content_begin < 0 || content_begin >= content_end || content_end > nq) throw Error("bad question content range");
    const int64_t n_content = content_end - content_begin;
    using clock = std::chrono::steady_clock;
    score_stats_ = ScoreStats{};
    if (!scorer_is_resident(scorer)) {
        for (size_t ch = 0; ch < ix_.chunks.size(); ++ch) ix_.check_low(ch);  // mapped indexes: file unchanged, rows verified
    }
    if (scorer == Scorer::Embedding || scorer == Scorer::MaxSim) {  // no model pass: input embeddings only
        const auto t0 = clock::now();
        std::vector<float> q(static_cast<size_t>(n_content) * c.n_embd);  // [n_content, n_embd]
        s_.model().embed(question.data() + content_begin, n_content, q.data());
        std::vector<float> out;
        if (scorer == Scorer::MaxSim) {
            out = score_maxsim(ix_, q.data(), n_content, s_.pool(), &score_stats_.reads);
        } else {
            out = score_embedding(ix_, q.data(), n_content);
            for (const auto& ch : ix_.chunks) score_stats_.reads.signature_bytes += ch.emb_sig.size() * sizeof(float);
        }
        score_stats_.scan_seconds = std::chrono::duration<double>(clock::now() - t0).count();
        return out;
    }
    // One question pass over the H-only cache gives the question's pre-RoPE queries per layer (the
    // tokens see the video only through H, which is what this question would see without reload).
    // The template tokens after the content vote too: they set each chunk's typical mass (the median),
    // against which the content tokens' peak is measured.
    if (nq > max_tail_) throw BudgetError("question too long");
    const auto t0 = clock::now();
    const std::vector<float> x = embed_tokens(s_.model(), question);
    const int32_t q_pos0 = compact_only_.layout.tail_pos;
    const std::vector<int32_t> pos = iota_pos(q_pos0, nq, s_.model().config().n_pos_axes);
    const std::vector<float> q_tok = cache_->question_queries(x.data(), nq, pos.data());  // [n_layer, nq, QD]
    history_.clear();
    const auto t1 = clock::now();
    ScoreReads* reads = &score_stats_.reads;
    std::vector<float> out;
    switch (scorer) {
        case Scorer::Keys:
            out = score_keys(ix_, q_tok.data(), nq, content_begin, content_end, c.n_head, s_.pool(), reads);
            break;
        case Scorer::High:
        case Scorer::HighKeys:
            out = score_high(ix_, q_tok.data(), nq, content_begin, content_end, c.n_head, s_.model().rope_spec(), q_pos0,
                             scorer == Scorer::HighKeys, s_.pool(), reads);
            break;
        default:
            out = score_attention(ix_, q_tok.data(), nq, content_begin, content_end, c.n_head, s_.model().rope_spec(),
                                  s_.pool(), reads);
    }
    score_stats_.pass_seconds = std::chrono::duration<double>(t1 - t0).count();
    score_stats_.scan_seconds = std::chrono::duration<double>(clock::now() - t1).count();
    const std::vector<int> selected = plan_.selected;
    prepare(selected);  // restore the mixed cache of the current selection
    return out;
}

void X2LDecoder::prepare(const std::vector<int>& selected) {
    MixedCachePlan plan = plan_mixed_cache(ix_, selected, question_gap_);  // throws for a bad selection, before anything changes
    for (int c : plan.selected) ix_.check_low(static_cast<size_t>(c));  // mapped indexes: file unchanged, rows verified
    history_.clear();
    plan_ = compact_only_;
    cache_->prepare(plan.layout);  // on failure: the H-only cache, nothing selected
    plan_ = std::move(plan);
}

void X2LDecoder::eval(const std::vector<int32_t>& tokens, std::vector<float>* all_out) {
    if (tokens.empty()) return;
    ix_.check_file();  // mapped indexes: the reload and (Jetson) the device read the file's pages
    if (n_past() + static_cast<int64_t>(tokens.size()) > n_ctx()) {
        throw BudgetError("question/answer budget of " + std::to_string(n_ctx()) + " tokens exceeded");
    }
    const LlmConfig& c = s_.model().config();
    for (int32_t t : tokens) {
        if (t < 0 || t >= c.n_vocab) throw Error("token id " + std::to_string(t) + " is out of range");
    }
    eval_rows(*cache_, c.n_embd, c.n_vocab, static_cast<int64_t>(tokens.size()), s_.options().n_batch,
              plan_.layout.tail_pos + static_cast<int32_t>(n_past()),
              [&](int64_t b, int64_t m, float* x) { s_.model().embed(tokens.data() + b, m, x); }, last_logits_, all_out,
              c.n_pos_axes, &s_.interrupt());
    history_.insert(history_.end(), tokens.begin(), tokens.end());
}

int32_t X2LDecoder::sample(Sampler& sampler) {
    if (last_logits_.empty()) throw Error("nothing evaluated yet");
    std::vector<float> logits = last_logits_;
    return sampler.sample(logits.data(), static_cast<int32_t>(logits.size()), history_.data(), n_past());
}

void X2LDecoder::truncate(int64_t n) {
    if (n < 0 || n > n_past()) throw Error("truncate: n out of range");
    cache_->truncate(n);
    history_.resize(static_cast<size_t>(n));
}

}  // namespace x2l
