#include "llm/session.h"

#include <algorithm>
#include <cstring>

#include "core/common.h"
#include "cpu/features.h"

namespace x2l {

std::vector<float> embed_tokens(const LlmModel& model, const std::vector<int32_t>& tokens) {
    const LlmConfig& c = model.config();
    for (int32_t t : tokens) {
        if (t < 0 || t >= c.n_vocab) throw Error("token id " + std::to_string(t) + " is out of range");
    }
    std::vector<float> x(tokens.size() * static_cast<size_t>(c.n_embd));  // [n, n_embd]
    model.embed(tokens.data(), static_cast<int64_t>(tokens.size()), x.data());
    return x;
}

LlmSession::LlmSession(const std::string& path, const SessionOptions& opt, const LlmExecutorFactory& make_executor)
    : opt_(opt) {
    if (opt_.n_threads < 0) throw Error("n_threads must be >= 0");
    if (opt_.n_batch <= 0) throw Error("n_batch must be > 0");
    if (opt_.n_ctx < 0) throw Error("n_ctx must be >= 0");
    file_ = GGUFFile::open(path);
    model_ = LlmModel::load(*file_);
    tokenizer_ = Tokenizer::from_gguf(*file_);
    const LlmConfig& c = model_->config();
    // One token per embedding row: more tokens could not be embedded, fewer could not spell every id
    // the model may sample (converters pad the vocabulary to the table, as llama.cpp's does).
    if (tokenizer_->n_vocab() != c.n_vocab) {
        throw FormatError("tokenizer has " + std::to_string(tokenizer_->n_vocab()) + " tokens but the embedding table " +
                          std::to_string(c.n_vocab) + " rows");
    }
    if (opt_.n_threads == 0) opt_.n_threads = default_threads();
    if (opt_.n_ctx == 0) opt_.n_ctx = std::min<int64_t>(c.n_ctx_train, 4096);
    pool_.reset(new ThreadPool(opt_.n_threads));
    executor_ = make_executor(*model_, *pool_, opt_);
    ctx_ = executor_->new_context(opt_.n_ctx);
    last_logits_.assign(c.n_vocab, 0.0f);
}

LlmSession::~LlmSession() = default;

void LlmSession::eval(const std::vector<int32_t>& tokens, std::vector<float>* all_out) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (n == 0) return;
    if (n_past() + n > n_ctx()) {
        throw BudgetError("context is full: " + std::to_string(n_past()) + " + " + std::to_string(n) +
                          " tokens exceed n_ctx=" + std::to_string(n_ctx()));
    }
    const LlmConfig& c = model_->config();
    for (int32_t t : tokens) {
        if (t < 0 || t >= c.n_vocab) throw Error("token id " + std::to_string(t) + " is out of range");
    }
    eval_rows(*ctx_, c.n_embd, c.n_vocab, n, opt_.n_batch, static_cast<int32_t>(n_past()),
              [&](int64_t b, int64_t m, float* x) { model_->embed(tokens.data() + b, m, x); }, last_logits_, all_out);
    history_.insert(history_.end(), tokens.begin(), tokens.end());
}

void LlmSession::eval_embd(const float* embd, int64_t n, std::vector<float>* all_out) {
    const LlmConfig& c = model_->config();
    if (n <= 0) return;
    if (n_past() + n > n_ctx()) {
        throw BudgetError("context is full: " + std::to_string(n_past()) + " + " + std::to_string(n) +
                          " embeddings exceed n_ctx=" + std::to_string(n_ctx()));
    }
    const int64_t E = c.n_embd;
    eval_rows(*ctx_, E, c.n_vocab, n, opt_.n_batch, static_cast<int32_t>(n_past()),
              [&](int64_t b, int64_t m, float* x) { std::memcpy(x, embd + b * E, sizeof(float) * m * E); },
              last_logits_, all_out);
    history_.insert(history_.end(), static_cast<size_t>(n), kEmbeddingToken);
}

int32_t LlmSession::sample(Sampler& s) {
    std::vector<float> logits = last_logits_;  // penalties modify a copy
    return s.sample(logits.data(), static_cast<int32_t>(logits.size()), history_.data(), n_past());
}

void LlmSession::truncate(int64_t n) {
    if (n < 0 || n > n_past()) throw Error("truncate: n out of range");
    ctx_->truncate(n);
    history_.resize(static_cast<size_t>(n));
}

}  // namespace x2l
