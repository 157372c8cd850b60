#include "x2l/select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/common.h"
#include "core/formats.h"
#include "x2l/compress.h"
#include "cpu/quant.h"
#include "core/threadpool.h"

namespace x2l {

Scorer scorer_from_name(const std::string& name) {
    if (name == "attention") return Scorer::Attention;
    if (name == "keys") return Scorer::Keys;
    if (name == "embedding") return Scorer::Embedding;
    if (name == "high") return Scorer::High;
    if (name == "high_keys") return Scorer::HighKeys;
    if (name == "maxsim") return Scorer::MaxSim;
    throw Error("unknown scorer '" + name +
                "' (attention, keys, embedding, high, high_keys, maxsim, or external scores from Python)");
}

bool scorer_is_resident(Scorer s) { return s != Scorer::Attention; }

SelectRule select_rule_from_name(const std::string& name) {
    if (name == "top_k") return SelectRule::TopK;
    if (name == "gap") return SelectRule::Gap;
    if (name == "mass") return SelectRule::Mass;
    throw Error("unknown selection rule '" + name + "' (top_k, gap, mass)");
}

std::vector<float> score_embedding(const VideoIndex& ix, const float* q, int64_t n_q) {
    const int E = ix.n_embd;
    std::vector<double> qm(E, 0.0);
    for (int64_t t = 0; t < n_q; ++t) {
        for (int i = 0; i < E; ++i) qm[i] += q[t * E + i] / static_cast<double>(n_q);
    }
    // Centre the frame embeddings on their mean, for the same reason as the keys.
    std::vector<double> center(E, 0.0);
    int64_t n_frames = 0;
    for (const auto& ch : ix.chunks) {
        for (int f = 0; f < ch.n_frames; ++f, ++n_frames) {
            for (int i = 0; i < E; ++i) center[i] += ch.emb_sig[static_cast<size_t>(f) * E + i];
        }
    }
    for (double& v : center) v /= static_cast<double>(std::max<int64_t>(1, n_frames));
    std::vector<float> scores(ix.chunks.size());
    for (size_t c = 0; c < ix.chunks.size(); ++c) {
        const auto& ch = ix.chunks[c];
        float best = -INFINITY;
        for (int f = 0; f < ch.n_frames; ++f) {
            const float* v = ch.emb_sig.data() + static_cast<size_t>(f) * E;
            double d = 0.0;
            for (int i = 0; i < E; ++i) d += qm[i] * (v[i] - center[i]);
            best = std::max(best, static_cast<float>(d));
        }
        scores[c] = best;
    }
    return scores;
}

std::vector<uint16_t> distinct_input_rows(const float* embd, int64_t n, int n_embd, int64_t n_rows) {
    if (n < 1 || n_embd < 1 || n_rows < 1) throw Error("distinct_input_rows: need n, n_embd, n_rows >= 1");
    const size_t E = static_cast<size_t>(n_embd);
    auto row = [&](int64_t t) { return embd + static_cast<size_t>(t) * E; };
    // The first occurrence of every distinct row, in input order (rows sorted by content to find repeats).
    std::vector<int64_t> by_content(static_cast<size_t>(n));
    std::iota(by_content.begin(), by_content.end(), 0);
    auto less = [&](int64_t a, int64_t b) {
        const int d = std::memcmp(row(a), row(b), E * sizeof(float));
        return d != 0 ? d < 0 : a < b;
    };
    std::sort(by_content.begin(), by_content.end(), less);
    std::vector<int64_t> distinct;
    for (size_t i = 0; i < by_content.size(); ++i) {
        const bool repeat = i > 0 && std::memcmp(row(by_content[i - 1]), row(by_content[i]), E * sizeof(float)) == 0;
        if (!repeat) distinct.push_back(by_content[i]);
    }
    std::sort(distinct.begin(), distinct.end());
    std::vector<double> mean(E, 0.0);
    for (int64_t t : distinct) {
        for (size_t i = 0; i < E; ++i) mean[i] += row(t)[i];
    }
    for (double& v : mean) v /= static_cast<double>(distinct.size());
    std::vector<double> dist2(distinct.size(), 0.0);
    for (size_t j = 0; j < distinct.size(); ++j) {
        for (size_t i = 0; i < E; ++i) dist2[j] += (row(distinct[j])[i] - mean[i]) * (row(distinct[j])[i] - mean[i]);
    }
    std::vector<size_t> order(distinct.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return dist2[a] > dist2[b]; });
    const size_t m = std::min(order.size(), static_cast<size_t>(n_rows));
    std::sort(order.begin(), order.begin() + m);  // input order
    std::vector<uint16_t> out(m * E);
    for (size_t j = 0; j < m; ++j) fp32_to_fp16_row(row(distinct[order[j]]), out.data() + j * E, n_embd);
    return out;
}

std::vector<float> score_maxsim(const VideoIndex& ix, const float* q, int64_t n_q, ThreadPool& pool, ScoreReads* reads) {
    const size_t E = static_cast<size_t>(ix.n_embd), nc = ix.chunks.size();
    for (size_t c = 0; c < nc; ++c) {
        if (ix.chunks[c].row_sig.empty()) {
            throw Error("this index has no row signatures for the maxsim scorer (saved by index format 3 or 4): "
                        "index the input again, or use another scorer");
        }
    }
    if (n_q < 1) throw Error("score_maxsim: empty question");
    std::vector<float> qn(q, q + static_cast<size_t>(n_q) * E);  // [n_q, n_embd] unit rows (zero rows stay zero)
    for (int64_t t = 0; t < n_q; ++t) {
        float* v = qn.data() + static_cast<size_t>(t) * E;
        const float norm = std::sqrt(dot_f32(v, v, static_cast<int64_t>(E)));
        if (norm > 0.0f) {
            for (size_t i = 0; i < E; ++i) v[i] /= norm;
        }
    }
    std::vector<float> best(static_cast<size_t>(n_q) * nc, -INFINITY);  // [n_q, chunk]: m_t(c)
    pool.run([&](int ith, int nth) {
        std::vector<float> r(E);
        for (size_t c = static_cast<size_t>(ith); c < nc; c += static_cast<size_t>(nth)) {
            const std::vector<uint16_t>& sig = ix.chunks[c].row_sig;
            for (size_t j = 0; j < sig.size() / E; ++j) {
                fp16_to_fp32_row(sig.data() + j * E, r.data(), static_cast<int64_t>(E));
                const float norm = std::sqrt(dot_f32(r.data(), r.data(), static_cast<int64_t>(E)));
                const float inv = norm > 0.0f ? 1.0f / norm : 0.0f;
                for (int64_t t = 0; t < n_q; ++t) {
                    const float cosine = inv * dot_f32(qn.data() + static_cast<size_t>(t) * E, r.data(), static_cast<int64_t>(E));
                    float& b = best[static_cast<size_t>(t) * nc + c];
                    b = std::max(b, cosine);
                }
            }
        }
    });
    if (reads) {
        for (const auto& ch : ix.chunks) reads->signature_bytes += ch.row_sig.size() * sizeof(uint16_t);
    }
    std::vector<double> scores(nc, 0.0);
    std::vector<float> column(nc);
    for (int64_t t = 0; t < n_q; ++t) {
        const float* m = best.data() + static_cast<size_t>(t) * nc;
        std::copy_n(m, nc, column.begin());
        const auto mid = column.begin() + nc / 2;
        std::nth_element(column.begin(), mid, column.end());
        double median = *mid;
        if (nc % 2 == 0) median = 0.5 * (median + *std::max_element(column.begin(), mid));
        for (size_t c = 0; c < nc; ++c) scores[c] += m[c] - median;
    }
    return std::vector<float>(scores.begin(), scores.end());
}

// Every chunk's pre-RoPE L keys of one (layer, KV head), in chunk order. out: [n_low_entries, head_dim]
// reads: bytes of the L rows read.
static void low_keys_pre_rope(const VideoIndex& ix, int layer, int head, const RopeSpec& rope_spec, float* out,
                              ScoreReads& reads) {
    for (const auto& ch : ix.chunks) {
        for (int64_t e = 0; e < ch.low->size(); ++e, out += ix.head_dim) {
            key_pre_rope(*ch.low, layer, head, e, ch.low_row_pos(layer, head, e), rope_spec, out);
        }
        reads.low_bytes += static_cast<size_t>(ch.low->size()) * row_bytes(ch.low->type(), ix.head_dim);
    }
}

std::vector<float> distinct_pre_rope_keys(const KVSegment& seg, int64_t n, const EntryPos& pos,
                                          const RopeSpec& rope_spec, int n_keys) {
    const int L = seg.n_layer(), H = seg.n_head_kv(), hd = seg.head_dim();
    const int64_t m = std::min<int64_t>(n_keys, n);
    std::vector<float> out(static_cast<size_t>(L) * H * m * hd);
    std::vector<float> keys(static_cast<size_t>(n) * hd), dist(n);
    std::vector<double> mean(hd);
    std::vector<int64_t> order(n);
    for (int l = 0; l < L; ++l) {
        for (int h = 0; h < H; ++h) {
            std::fill(mean.begin(), mean.end(), 0.0);
            for (int64_t e = 0; e < n; ++e) {
                float* k = keys.data() + e * hd;
                key_pre_rope(seg, l, h, e, pos(l, h, e), rope_spec, k);
                for (int i = 0; i < hd; ++i) mean[i] += k[i] / static_cast<double>(n);
            }
            for (int64_t e = 0; e < n; ++e) {
                double d2 = 0.0;
                for (int i = 0; i < hd; ++i) d2 += (keys[e * hd + i] - mean[i]) * (keys[e * hd + i] - mean[i]);
                dist[e] = static_cast<float>(d2);
            }
            std::iota(order.begin(), order.end(), 0);
            std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return dist[a] > dist[b]; });
            std::sort(order.begin(), order.begin() + m);  // entry order
            float* dst = out.data() + (static_cast<size_t>(l) * H + h) * m * hd;
            for (int64_t i = 0; i < m; ++i) std::copy_n(keys.data() + order[i] * hd, hd, dst + i * hd);
        }
    }
    return out;
}

std::vector<float> peak_significance(const double* mass, int64_t n_tokens, int64_t n_content, size_t n_chunks) {
    if (n_content <= 0 || n_content > n_tokens) throw Error("peak_significance: need 0 < n_content <= n_tokens");
    std::vector<float> scores(n_chunks);
    std::vector<double> column(static_cast<size_t>(n_tokens));
    for (size_t c = 0; c < n_chunks; ++c) {
        double peak = -INFINITY;
        for (int64_t t = 0; t < n_tokens; ++t) {
            column[t] = mass[t * n_chunks + c];
            if (t < n_content) peak = std::max(peak, column[t]);
        }
        const auto mid = column.begin() + n_tokens / 2;
        std::nth_element(column.begin(), mid, column.end());
        double median = *mid;
        if (n_tokens % 2 == 0) median = 0.5 * (median + *std::max_element(column.begin(), mid));
        scores[c] = static_cast<float>((peak - median) / std::sqrt(std::max(median, 0.0) + 1e-12));
    }
    return scores;
}

namespace {

// The question-to-keys mass shared by the attention, keys and high scorers. fill_keys(l, h, out, reads)
// writes the n_all candidate keys of (layer l, KV head h), owner[e] their chunks, and adds the bytes of
// index rows it read to reads (a ScoreReads of its thread; summed into *reads). The first n_rotated
// candidates are post-RoPE keys, scored against the queries q_rot (rotated to their positions); the
// rest are pre-RoPE, scored against q_tok.
//
// Per voting token t (the question's content, then the template tokens after it) and chunk c, m_t(c) is
// the attention mass c's keys get from t: a softmax over all candidates of all chunks, as in the full
// cache, averaged over layers 1.. and query heads. The chunk score is a peak significance:
//   score(c) = (max over content tokens of m_t(c) - median over voting tokens of m_t(c)) / sqrt(median)
// The median is the mass the chunk draws whatever the token asks for: its size, attention sinks, and the
// early-context bias (question tokens favour the first chunk over later ones); the peak is the one
// token (often the key word) that singles the chunk out; sqrt(median) scales the excess the way count
// noise scales. It replaced mean-minus-tail-baseline aggregation, chosen on dumped scorer inputs of
// SmolLM2 needles idx 0-39 and then checked on fresh ones (idx 50-89, 40 per task): multi-key
// chunk-recall@3 26 -> 40, top-1 9 -> 23; single top-1 24 -> 39 (top-3 40 both). The first chunk
// still makes the top 3 of nearly every question (its keys are computed with the least context).
template <class FillKeys>
std::vector<float> peak_mass_scores(const VideoIndex& ix, const float* q_tok, const float* q_rot, int64_t n_rotated,
                                    int64_t n_q, int64_t content_begin, int64_t content_end, int n_head,
                                    ThreadPool& pool, const std::vector<int>& owner, FillKeys fill_keys,
                                    ScoreReads* reads) {
    const int L = ix.n_layer, H = ix.n_head_kv, hd = ix.head_dim, group = n_head / H;
    const size_t nc = ix.chunks.size();
    const int64_t QD = static_cast<int64_t>(n_head) * hd;
    const int64_t n_all = static_cast<int64_t>(owner.size());
    if (n_all == 0 || content_end <= content_begin) return std::vector<float>(nc, 0.0f);
    const int64_t n_content = content_end - content_begin;
    const int64_t n_t = n_q - content_begin;  // tokens that vote: the content, then the tail
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const int l0 = L > 1 ? 1 : 0;  // layer 0 mostly sees token identity
    const int n_lh = (L - l0) * H;
    std::vector<double> mass(static_cast<size_t>(n_lh) * n_t * nc, 0.0);  // [layer, kv head, token, chunk]
    std::vector<ScoreReads> thread_reads(static_cast<size_t>(pool.n_threads()));
    pool.run([&](int ith, int nth) {
        std::vector<float> keys(static_cast<size_t>(n_all) * hd), p(static_cast<size_t>(n_all));
        for (int lh = ith; lh < n_lh; lh += nth) {
            const int l = l0 + lh / H, h = lh % H;
            fill_keys(l, h, keys.data(), thread_reads[ith]);
            for (int g = 0; g < group; ++g) {
                for (int64_t t = content_begin; t < n_q; ++t) {
                    // Softmax of this token's query over every candidate key of every chunk: the chunks
                    // compete for the token's attention, as they would in the full cache.
                    const size_t qoff = (static_cast<size_t>(l) * n_q + t) * QD + static_cast<size_t>(h * group + g) * hd;
                    const float* q = q_tok + qoff;
                    const float* qr = q_rot ? q_rot + qoff : q;
                    float mx = -INFINITY;
                    for (int64_t e = 0; e < n_all; ++e) {
                        p[e] = scale * dot_f32(e < n_rotated ? qr : q, keys.data() + static_cast<size_t>(e) * hd, hd);
                        mx = std::max(mx, p[e]);
                    }
                    double sum = 0.0;
                    for (int64_t e = 0; e < n_all; ++e) sum += (p[e] = std::exp(p[e] - mx));
                    double* m = mass.data() + (static_cast<size_t>(lh) * n_t + (t - content_begin)) * nc;
                    for (int64_t e = 0; e < n_all; ++e) m[owner[e]] += p[e] / sum;
                }
            }
        }
    });
    for (const ScoreReads& r : thread_reads) {
        if (!reads) break;
        reads->low_bytes += r.low_bytes;
        reads->high_bytes += r.high_bytes;
        reads->signature_bytes += r.signature_bytes;
    }
    // Average over layers and query heads in a fixed order: the scores do not depend on the thread count.
    std::vector<double> d(static_cast<size_t>(n_t) * nc, 0.0);  // [token, chunk]
    for (int lh = 0; lh < n_lh; ++lh) {
        for (size_t i = 0; i < d.size(); ++i) d[i] += mass[static_cast<size_t>(lh) * n_t * nc + i] / ((L - l0) * n_head);
    }
    return peak_significance(d.data(), n_t, n_content, nc);
}

// The chunk of every entry when chunk c holds counts[c] consecutive entries: [sum counts].
std::vector<int> entry_owners(const std::vector<int64_t>& counts) {
    std::vector<int> owner;
    for (size_t c = 0; c < counts.size(); ++c) owner.insert(owner.end(), static_cast<size_t>(counts[c]), static_cast<int>(c));
    return owner;
}

// Entries per chunk of one tier (its H or L segments).
std::vector<int64_t> tier_counts(const VideoIndex& ix, std::shared_ptr<KVSegment> ChunkKV::*tier) {
    std::vector<int64_t> n(ix.chunks.size());
    for (size_t c = 0; c < ix.chunks.size(); ++c) n[c] = (ix.chunks[c].*tier)->size();
    return n;
}

// Signature keys per chunk (of each layer and KV head).
std::vector<int64_t> signature_counts(const VideoIndex& ix) {
    const size_t per_key = static_cast<size_t>(ix.n_layer) * ix.n_head_kv * ix.head_dim;  // one key of every layer and head
    std::vector<int64_t> n_sig(ix.chunks.size());
    for (size_t c = 0; c < ix.chunks.size(); ++c) {
        const size_t sz = ix.chunks[c].key_sig.size();
        if (sz % per_key != 0) throw Error("key signature of chunk " + std::to_string(c) + " has a bad size");
        n_sig[c] = static_cast<int64_t>(sz / per_key);
    }
    return n_sig;
}

// Every chunk's signature keys of (layer l, KV head h), in chunk order: [sum n_sig, head_dim] at out.
float* copy_signatures(const VideoIndex& ix, const std::vector<int64_t>& n_sig, int l, int h, float* out, ScoreReads& reads) {
    const int H = ix.n_head_kv, hd = ix.head_dim;
    for (size_t c = 0; c < ix.chunks.size(); ++c) {
        const size_t n = static_cast<size_t>(n_sig[c]) * hd;
        std::copy_n(ix.chunks[c].key_sig.data() + (static_cast<size_t>(l) * H + h) * n, n, out);
        out += n;
        reads.signature_bytes += n * sizeof(float);
    }
    return out;
}

}  // namespace

std::vector<float> score_keys(const VideoIndex& ix, const float* q_tok, int64_t n_q, int64_t content_begin,
                              int64_t content_end, int n_head, ThreadPool& pool, ScoreReads* reads) {
    const std::vector<int64_t> n_sig = signature_counts(ix);
    return peak_mass_scores(ix, q_tok, nullptr, 0, n_q, content_begin, content_end, n_head, pool, entry_owners(n_sig),
                            [&](int l, int h, float* keys, ScoreReads& r) { copy_signatures(ix, n_sig, l, h, keys, r); }, reads);
}

std::vector<float> score_high(const VideoIndex& ix, const float* q_tok, int64_t n_q, int64_t content_begin,
                              int64_t content_end, int n_head, const RopeSpec& rope_spec, int32_t q_pos0,
                              bool with_signatures, ThreadPool& pool, ScoreReads* reads) {
    const int L = ix.n_layer, hd = ix.head_dim;
    const int64_t QD = static_cast<int64_t>(n_head) * hd;
    // [n_layer, n_q, n_head * head_dim]: the queries as the question pass rotated them.
    std::vector<float> q_rot(q_tok, q_tok + static_cast<size_t>(L) * n_q * QD);
    for (int l = 0; l < L; ++l) {
        for (int64_t t = 0; t < n_q; ++t) {
            rope(q_rot.data() + (static_cast<size_t>(l) * n_q + t) * QD, n_head, hd, rope_spec.rope_dim,
                 q_pos0 + static_cast<int32_t>(t), rope_spec.inv_freq, rope_spec.type);
        }
    }
    // The chunk of every H entry, then (with_signatures) of every signature key.
    std::vector<int> owner = entry_owners(tier_counts(ix, &ChunkKV::high));
    const int64_t n_high = static_cast<int64_t>(owner.size());
    std::vector<int64_t> n_sig;
    if (with_signatures) {
        n_sig = signature_counts(ix);
        const std::vector<int> sig_owner = entry_owners(n_sig);
        owner.insert(owner.end(), sig_owner.begin(), sig_owner.end());
    }
    // Each chunk moves to just before the question: its keys turn by q_pos0 - (the chunk's end), so every
    // chunk is as far from the question as the last one and recency does not outvote content (the
    // question would otherwise favour the chunks nearest to it). M-RoPE video keys rotate on three axes
    // that one shift cannot move consistently: there the keys stay where they are (the model's own
    // attention, recency included).
    std::vector<int32_t> shift(ix.chunks.size(), 0);
    if (ix.text_pos < 0) {
        for (size_t c = 0; c < ix.chunks.size(); ++c) {
            const KVSegment& seg = *ix.chunks[c].high;
            const int32_t end = ix.dense_positions ? (seg.size() > 0 ? seg.pos(seg.size() - 1) + 1 : 0) : ix.chunks[c].pos_end;
            shift[c] = q_pos0 - end;
        }
    }
    return peak_mass_scores(ix, q_tok, q_rot.data(), n_high, n_q, content_begin, content_end, n_head, pool, owner,
                            [&](int l, int h, float* keys, ScoreReads& r) {
        for (size_t c = 0; c < ix.chunks.size(); ++c) {
            const KVSegment& seg = *ix.chunks[c].high;
            for (int64_t e = 0; e < seg.size(); ++e, keys += hd) {
                dequantize_row(seg.type(), seg.k_row(l, h, e), keys, hd);
                if (shift[c] != 0) rope(keys, 1, hd, rope_spec.rope_dim, shift[c], rope_spec.inv_freq, rope_spec.type);
            }
            r.high_bytes += static_cast<size_t>(seg.size()) * row_bytes(seg.type(), hd);
        }
        if (with_signatures) copy_signatures(ix, n_sig, l, h, keys, r);
    }, reads);
}

std::vector<float> score_attention(const VideoIndex& ix, const float* q_tok, int64_t n_q, int64_t content_begin,
                                   int64_t content_end, int n_head, const RopeSpec& rope_spec, ThreadPool& pool,
                                   ScoreReads* reads) {
    return peak_mass_scores(ix, q_tok, nullptr, 0, n_q, content_begin, content_end, n_head, pool,
                            entry_owners(tier_counts(ix, &ChunkKV::low)),
                            [&](int l, int h, float* keys, ScoreReads& r) { low_keys_pre_rope(ix, l, h, rope_spec, keys, r); },
                            reads);
}

int shape_cut(const std::vector<float>& scores, const SelectOptions& o) {
    const int n = static_cast<int>(scores.size());
    if (o.max_k < 1) throw Error("max_k must be >= 1");
    const int K = std::min(o.max_k, n);
    if (K < 2) return K;
    std::vector<float> sorted(scores);
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    if (o.rule == SelectRule::Gap) {
        int best = 1;  // cut after rank best (1-based): the first of the largest drops
        for (int i = 1; i < K; ++i) {
            if (sorted[i - 1] - sorted[i] > sorted[best - 1] - sorted[best]) best = i;
        }
        return best;
    }
    if (o.rule == SelectRule::Mass) {
        if (!(o.mass_p > 0.0 && o.mass_p <= 1.0)) throw Error("mass_p must be in (0, 1]");
        double mean = 0.0, var = 0.0;
        for (float v : sorted) mean += v / static_cast<double>(n);
        for (float v : sorted) var += (v - mean) * (v - mean) / static_cast<double>(n);
        const double sd = std::sqrt(var);
        if (!(sd > 0.0)) return K;  // all equal: the scores say nothing
        double total = 0.0;
        std::vector<double> w(static_cast<size_t>(n));
        for (int i = 0; i < n; ++i) total += (w[i] = std::exp((sorted[i] - sorted[0]) / sd));
        double cum = 0.0;
        for (int i = 0; i < K; ++i) {
            cum += w[i] / total;
            if (cum >= o.mass_p * (1.0 - 1e-12)) return i + 1;
        }
        return K;
    }
    throw Error("shape_cut: not a score-shape rule");
}

std::vector<int> select_chunks(const VideoIndex& ix, const std::vector<float>& scores, const SelectOptions& o) {
    const int n = static_cast<int>(ix.chunks.size());
    if (static_cast<int>(scores.size()) != n) {
        throw Error("got " + std::to_string(scores.size()) + " scores for " + std::to_string(n) + " chunks");
    }
    if (o.top_k < 0) throw Error("top_k must be >= 0");
    const bool shaped = o.rule != SelectRule::TopK;
    for (float s : scores) {
        if (std::isnan(s)) throw Error("chunk scores contain NaN");
        if (shaped && std::isinf(s)) throw Error("chunk scores contain infinity (the gap and mass rules need finite scores)");
    }
    // The ranks it may take (a score-shape rule's cut, or all), and how many: top_k, or all that fit a budget.
    const int ranks = shaped ? shape_cut(scores, o) : n;
    const int limit = shaped ? ranks : o.budget_bytes > 0 ? n : o.top_k;
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores[a] > scores[b]; });
    std::vector<char> chosen(n, 0);
    size_t used = 0;
    auto extra = [&](int c) { return ix.low_bytes(c) > ix.high_bytes(c) ? ix.low_bytes(c) - ix.high_bytes(c) : 0; };
    if (n > 0 && o.include_first) chosen[0] = 1, used += extra(0);
    if (n > 0 && o.include_last) chosen[n - 1] = 1, used += extra(n - 1);
    int count = 0;
    for (int r = 0; r < ranks && count < limit; ++r) {
        const int c = order[r];
        if (chosen[c]) continue;
        if (o.budget_bytes > 0) {
            if (used + extra(c) > o.budget_bytes) continue;
            used += extra(c);
        }
        chosen[c] = 1;
        ++count;
    }
    std::vector<int> out;
    for (int c = 0; c < n; ++c) {
        if (chosen[c]) out.push_back(c);
    }
    return out;
}

}  // namespace x2l
