#include "llm/sampler.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "core/common.h"

namespace x2l {

Sampler::Sampler(const SamplerParams& p) : p_(p), rng_(p.seed) {
    if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) throw Error("temperature must be a finite number >= 0");
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) throw Error("top_p must be in (0, 1]");
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) throw Error("min_p must be in [0, 1]");
    if (!(p.repeat_penalty > 0.0f) || !std::isfinite(p.repeat_penalty)) throw Error("repeat_penalty must be > 0");
    if (p.repeat_last_n < 0) throw Error("repeat_last_n must be >= 0");
    if (p.top_k < 0) throw Error("top_k must be >= 0 (0: no top-k cut)");
}

int32_t Sampler::sample(float* logits, int32_t n_vocab, const int32_t* history, int64_t n_history) {
    if (n_vocab <= 0) throw Error("empty vocabulary");
    // NaN breaks the ordering the sort and max below rely on: say so instead of sampling junk.
    for (int32_t i = 0; i < n_vocab; ++i) {
        if (std::isnan(logits[i])) throw Error("the logits contain NaN: cannot sample");
    }
    if (p_.repeat_penalty != 1.0f && p_.repeat_last_n > 0 && n_history > 0) {
        // Each distinct recent token is penalised once: positive logits divided, negative multiplied.
        std::unordered_set<int32_t> seen;
        for (int64_t i = std::max<int64_t>(0, n_history - p_.repeat_last_n); i < n_history; ++i) {
            int32_t id = history[i];
            if (id < 0 || id >= n_vocab || !seen.insert(id).second) continue;
            logits[id] = logits[id] > 0 ? logits[id] / p_.repeat_penalty : logits[id] * p_.repeat_penalty;
        }
    }
    if (p_.temperature <= 0.0f) {
        return static_cast<int32_t>(std::max_element(logits, logits + n_vocab) - logits);
    }

    // Candidates sorted by logit (partial sort when top-k bounds them).
    cand_.resize(n_vocab);
    for (int32_t i = 0; i < n_vocab; ++i) cand_[i] = {logits[i], i};
    int32_t k = (p_.top_k > 0 && p_.top_k < n_vocab) ? p_.top_k : n_vocab;
    auto by_logit = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    std::partial_sort(cand_.begin(), cand_.begin() + k, cand_.end(), by_logit);
    cand_.resize(k);

    // Softmax at temperature.
    const float mx = cand_[0].first;
    std::vector<double> prob(k);
    double sum = 0.0;
    for (int32_t i = 0; i < k; ++i) {
        prob[i] = std::exp(static_cast<double>(cand_[i].first - mx) / p_.temperature);
        sum += prob[i];
    }
    for (auto& v : prob) v /= sum;

    int32_t keep = k;
    if (p_.min_p > 0.0f) {  // drop tokens below min_p * p(max)
        const double thr = p_.min_p * prob[0];
        int32_t m = 1;
        while (m < keep && prob[m] >= thr) ++m;
        keep = m;
    }
    if (p_.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p
        double cum = 0.0;
        int32_t m = 0;
        while (m < keep) {
            cum += prob[m++];
            if (cum >= p_.top_p) break;
        }
        keep = std::max<int32_t>(1, m);
    }
    double mass = 0.0;
    for (int32_t i = 0; i < keep; ++i) mass += prob[i];
    std::uniform_real_distribution<double> uni(0.0, mass);
    double r = uni(rng_);
    for (int32_t i = 0; i < keep; ++i) {
        r -= prob[i];
        if (r <= 0.0) return cand_[i].second;
    }
    return cand_[keep - 1].second;
}

}  // namespace x2l
