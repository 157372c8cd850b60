// Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, seeded.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace x2l {

struct SamplerParams {
    float temperature = 0.0f;     // <= 0: greedy
    int top_k = 0;                // <= 0: off
    float top_p = 1.0f;           // >= 1: off
    float min_p = 0.0f;           // <= 0: off
    float repeat_penalty = 1.0f;  // 1: off; applied to the last repeat_last_n tokens (llama.cpp rule)
    int repeat_last_n = 64;
    uint64_t seed = 0;
};

class Sampler {
  public:
    explicit Sampler(const SamplerParams& p);  // throws Error on invalid parameters
    // logits [n_vocab] are modified in place (penalties); history: tokens generated or seen so far.
    int32_t sample(float* logits, int32_t n_vocab, const int32_t* history, int64_t n_history);
    const SamplerParams& params() const { return p_; }

  private:
    SamplerParams p_;
    std::mt19937_64 rng_;
    std::vector<std::pair<float, int32_t>> cand_;
};

}  // namespace x2l
