#include "select.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common.h"

namespace x2l {

Scorer scorer_from_name(const std::string& name) {
    if (name == "attention") return Scorer::Attention;
    if (name == "keys") return Scorer::Keys;
    if (name == "embedding") return Scorer::Embedding;
    throw Error("unknown scorer '" + name + "' (attention, keys, embedding, or external scores from Python)");
}

std::vector<float> score_keys(const VideoIndex& ix, const std::vector<float>& q_mean, int n_head) {
    const int L = ix.n_layer, H = ix.n_head_kv, hd = ix.head_dim;
    const int group = n_head / H;
    const size_t nc = ix.chunks.size();
    if (q_mean.size() != static_cast<size_t>(L) * n_head * hd) throw Error("score_keys: bad query size");
    std::vector<float> scores(nc, 0.0f);
    if (nc == 0) return scores;
    // Chunk keys share a large common component (same model, same kind of input): compare the
    // question with each chunk's deviation from the mean chunk, or every chunk scores alike.
    const size_t KD = static_cast<size_t>(H) * hd;
    std::vector<double> center(static_cast<size_t>(L) * KD, 0.0);
    for (const auto& ch : ix.chunks) {
        for (size_t i = 0; i < center.size(); ++i) center[i] += ch.key_sig[i] / static_cast<double>(nc);
    }
    // Per layer and query head: the attention logit the mean question query would give each chunk's
    // mean (centred) key, standardised across chunks so that every head votes with the same weight.
    std::vector<double> dots(nc);
    const int l0 = L > 1 ? 1 : 0;  // layer 0 mostly sees token identity
    for (int l = l0; l < L; ++l) {
        for (int h = 0; h < n_head; ++h) {
            const float* q = q_mean.data() + (static_cast<size_t>(l) * n_head + h) * hd;
            const size_t koff = static_cast<size_t>(l) * KD + static_cast<size_t>(h / group) * hd;
            double mean = 0.0;
            for (size_t c = 0; c < nc; ++c) {
                const float* k = ix.chunks[c].key_sig.data() + koff;
                double d = 0.0;
                for (int i = 0; i < hd; ++i) d += static_cast<double>(q[i]) * (k[i] - center[koff + i]);
                dots[c] = d;
                mean += d / static_cast<double>(nc);
            }
            double var = 0.0;
            for (double d : dots) var += (d - mean) * (d - mean) / static_cast<double>(nc);
            const double sd = std::sqrt(var) + 1e-12;
            for (size_t c = 0; c < nc; ++c) scores[c] += static_cast<float>((dots[c] - mean) / sd);
        }
    }
    for (float& v : scores) v /= static_cast<float>((L - l0) * n_head);
    return scores;
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

std::vector<float> score_attention(const VideoIndex& ix, const std::vector<float>& mass, const std::vector<float>& base) {
    std::vector<float> scores(ix.chunks.size(), 0.0f);
    size_t off = ix.sink->size();
    for (size_t c = 0; c < ix.chunks.size(); ++c) {
        const int64_t n = ix.chunks[c].high->size();
        // The entry the question's own tokens favour most over what the template tokens already
        // attend to: a needle is a few entries, so a maximum finds it where a chunk mean dilutes it.
        float best = -INFINITY;
        for (int64_t i = 0; i < n && off + i < mass.size(); ++i) {
            best = std::max(best, mass[off + i] - (base.empty() ? 0.0f : base[off + i]));
        }
        scores[c] = n > 0 ? best : 0.0f;
        off += static_cast<size_t>(n);
    }
    return scores;
}

std::vector<int> select_chunks(const VideoIndex& ix, const std::vector<float>& scores, const SelectOptions& o) {
    const int n = static_cast<int>(ix.chunks.size());
    if (static_cast<int>(scores.size()) != n) {
        throw Error("got " + std::to_string(scores.size()) + " scores for " + std::to_string(n) + " chunks");
    }
    if (o.top_k < 0) throw Error("top_k must be >= 0");
    for (float s : scores) {
        if (std::isnan(s)) throw Error("chunk scores contain NaN");
    }
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores[a] > scores[b]; });
    std::vector<char> chosen(n, 0);
    size_t used = 0;
    auto extra = [&](int c) { return ix.low_bytes(c) > ix.high_bytes(c) ? ix.low_bytes(c) - ix.high_bytes(c) : 0; };
    if (n > 0 && o.include_first) chosen[0] = 1, used += extra(0);
    if (n > 0 && o.include_last) chosen[n - 1] = 1, used += extra(n - 1);
    int count = 0;
    for (int c : order) {
        if (chosen[c]) continue;
        if (o.budget_bytes > 0) {
            if (used + extra(c) > o.budget_bytes) continue;
            used += extra(c);
        } else {
            if (count >= o.top_k) break;
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
