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
    if (q_mean.size() != static_cast<size_t>(L) * n_head * hd) throw Error("score_keys: bad query size");
    std::vector<float> scores(ix.chunks.size(), 0.0f);
    std::vector<float> qg(static_cast<size_t>(H) * hd);
    const int l0 = L > 1 ? 1 : 0;
    for (int l = l0; l < L; ++l) {
        // Average the query heads that share each KV head.
        std::fill(qg.begin(), qg.end(), 0.0f);
        for (int h = 0; h < n_head; ++h) {
            const float* q = q_mean.data() + (static_cast<size_t>(l) * n_head + h) * hd;
            float* d = qg.data() + static_cast<size_t>(h / group) * hd;
            for (int i = 0; i < hd; ++i) d[i] += q[i] / group;
        }
        double qn = 0.0;
        for (float v : qg) qn += static_cast<double>(v) * v;
        for (size_t c = 0; c < ix.chunks.size(); ++c) {
            const float* k = ix.chunks[c].key_sig.data() + static_cast<size_t>(l) * H * hd;
            double dot = 0.0, kn = 0.0;
            for (size_t i = 0; i < qg.size(); ++i) {
                dot += static_cast<double>(qg[i]) * k[i];
                kn += static_cast<double>(k[i]) * k[i];
            }
            scores[c] += static_cast<float>(dot / (std::sqrt(qn * kn) + 1e-12));
        }
    }
    for (float& s : scores) s /= static_cast<float>(L - l0);
    return scores;
}

std::vector<float> score_embedding(const VideoIndex& ix, const float* q, int64_t n_q) {
    const int E = ix.n_embd;
    std::vector<double> qm(E, 0.0);
    for (int64_t t = 0; t < n_q; ++t) {
        for (int i = 0; i < E; ++i) qm[i] += q[t * E + i] / static_cast<double>(n_q);
    }
    std::vector<float> scores(ix.chunks.size());
    for (size_t c = 0; c < ix.chunks.size(); ++c) {
        const auto& ch = ix.chunks[c];
        float best = -INFINITY;
        for (int f = 0; f < ch.n_frames; ++f) {
            const float* v = ch.emb_sig.data() + static_cast<size_t>(f) * E;
            double d = 0.0;
            for (int i = 0; i < E; ++i) d += qm[i] * v[i];
            best = std::max(best, static_cast<float>(d));
        }
        scores[c] = best;
    }
    return scores;
}

std::vector<float> score_attention(const VideoIndex& ix, const std::vector<float>& mass) {
    std::vector<float> scores(ix.chunks.size(), 0.0f);
    size_t off = ix.sink->size();
    for (size_t c = 0; c < ix.chunks.size(); ++c) {
        const int64_t n = ix.chunks[c].high->size();
        double s = 0.0;
        for (int64_t i = 0; i < n && off + i < mass.size(); ++i) s += mass[off + i];
        scores[c] = n > 0 ? static_cast<float>(s / n) : 0.0f;
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
