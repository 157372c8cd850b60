#include "session.h"

#include <algorithm>
#include <cstring>

#include "backend.h"
#include "common.h"

namespace x2l {

LlmSession::LlmSession(const std::string& path, const SessionOptions& opt) : opt_(opt) {
    if (opt_.n_threads < 0) throw Error("n_threads must be >= 0");
    if (opt_.n_batch <= 0) throw Error("n_batch must be > 0");
    if (opt_.n_ctx < 0) throw Error("n_ctx must be >= 0");
    file_ = GGUFFile::open(path);
    model_ = LlmModel::load(*file_);
    tokenizer_ = Tokenizer::from_gguf(*file_);
    const LlmConfig& c = model_->config();
    if (tokenizer_->n_vocab() > c.n_vocab) {
        throw FormatError("tokenizer has " + std::to_string(tokenizer_->n_vocab()) + " tokens but the model only " +
                          std::to_string(c.n_vocab));
    }
    if (opt_.n_threads == 0) opt_.n_threads = default_threads();
    if (opt_.n_ctx == 0) opt_.n_ctx = std::min<int64_t>(c.n_ctx_train, 4096);
    pool_.reset(new ThreadPool(opt_.n_threads));
    cache_.reset(new KVCache(opt_.kv_type, c.n_layer, c.n_head_kv, c.head_dim, opt_.n_ctx));
    last_logits_.assign(c.n_vocab, 0.0f);
}

void LlmSession::eval(const std::vector<int32_t>& tokens, std::vector<float>* all_out) {
    const LlmConfig& c = model_->config();
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (n == 0) return;
    if (n_past() + n > n_ctx()) {
        throw BudgetError("context is full: " + std::to_string(n_past()) + " + " + std::to_string(n) +
                          " tokens exceed n_ctx=" + std::to_string(n_ctx()));
    }
    for (int32_t t : tokens) {
        if (t < 0 || t >= c.n_vocab) throw Error("token id " + std::to_string(t) + " is out of range");
    }
    if (all_out) all_out->resize(static_cast<size_t>(n) * c.n_vocab);
    const int64_t start = n_past();
    std::vector<int32_t> pos;
    try {
        for (int64_t b = 0; b < n; b += opt_.n_batch) {
            const int64_t m = std::min(opt_.n_batch, n - b);
            x_.resize(static_cast<size_t>(m) * c.n_embd);
            model_->embed(tokens.data() + b, m, x_.data());
            pos.resize(m);
            for (int64_t i = 0; i < m; ++i) pos[i] = static_cast<int32_t>(start + b + i);
            const bool last = b + m == n;
            if (all_out) {
                model_->forward(*pool_, ws_, x_.data(), m, pos.data(), *cache_, m, all_out->data() + b * c.n_vocab);
                if (last) std::memcpy(last_logits_.data(), all_out->data() + (n - 1) * c.n_vocab, sizeof(float) * c.n_vocab);
            } else {
                model_->forward(*pool_, ws_, x_.data(), m, pos.data(), *cache_, last ? 1 : 0, last_logits_.data());
            }
            history_.insert(history_.end(), tokens.begin() + b, tokens.begin() + b + m);
        }
    } catch (...) {
        truncate(start);
        throw;
    }
}

int32_t LlmSession::sample(Sampler& s) {
    std::vector<float> logits = last_logits_;  // penalties modify a copy
    return s.sample(logits.data(), static_cast<int32_t>(logits.size()), history_.data(), n_past());
}

void LlmSession::truncate(int64_t n) {
    if (n < 0 || n > n_past()) throw Error("truncate: n out of range");
    cache_->truncate(n);
    history_.resize(static_cast<size_t>(n));
}

}  // namespace x2l
