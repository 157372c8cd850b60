#include "llm/session.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>

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
    if (opt_.n_ctx > std::numeric_limits<int32_t>::max()) {
        throw BudgetError("n_ctx=" + std::to_string(opt_.n_ctx) + " exceeds the 2^31 positions a context can hold");
    }
    pool_.reset(new ThreadPool(opt_.n_threads));
    executor_ = make_executor(*model_, *pool_, opt_);
    executor_->set_interrupt(&interrupt_);
    // The KV cache is allocated up front (the executor has checked kv_type against head_dim): one larger
    // than this machine's memory is a BudgetError now, not std::bad_alloc (or the OOM killer later, once an
    // overcommitted allocation is touched).
    const size_t row = row_bytes(opt_.kv_type, c.head_dim);
    size_t kv = 0;
    const bool overflow = __builtin_mul_overflow(row, static_cast<size_t>(opt_.n_ctx) * 2, &kv) ||
                          __builtin_mul_overflow(kv, static_cast<size_t>(c.n_layer) * c.n_head_kv, &kv);
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    const size_t host = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
    if (overflow || (opt_.device < 0 && host > 0 && kv > host)) {
        throw BudgetError("n_ctx=" + std::to_string(opt_.n_ctx) + " needs a KV cache of " +
                          (overflow ? std::string("more than 2^64 bytes") : std::to_string(kv >> 20) + " MiB") +
                          ", more than this machine's memory" + (overflow ? "" : " (" + std::to_string(host >> 20) + " MiB)"));
    }
    try {
        ctx_ = executor_->new_context(opt_.n_ctx);
    } catch (const std::bad_alloc&) {
        throw BudgetError("cannot allocate the KV cache for n_ctx=" + std::to_string(opt_.n_ctx) + " (" +
                          std::to_string(kv >> 20) + " MiB)");
    }
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
    const int32_t start = next_position();
    eval_rows(*ctx_, c.n_embd, c.n_vocab, n, opt_.n_batch, start,
              [&](int64_t b, int64_t m, float* x) { model_->embed(tokens.data() + b, m, x); }, last_logits_, all_out,
              c.n_pos_axes, &interrupt_);
    history_.insert(history_.end(), tokens.begin(), tokens.end());
    push_positions(n, start + static_cast<int32_t>(n));
}

void LlmSession::eval_embd(const float* embd, int64_t n, std::vector<float>* all_out) {
    const LlmConfig& c = model_->config();
    if (n <= 0) return;
    if (n_past() + n > n_ctx()) {
        throw BudgetError("context is full: " + std::to_string(n_past()) + " + " + std::to_string(n) +
                          " embeddings exceed n_ctx=" + std::to_string(n_ctx()));
    }
    const int64_t E = c.n_embd;
    const int32_t start = next_position();
    eval_rows(*ctx_, E, c.n_vocab, n, opt_.n_batch, start,
              [&](int64_t b, int64_t m, float* x) { std::memcpy(x, embd + b * E, sizeof(float) * m * E); },
              last_logits_, all_out, c.n_pos_axes, &interrupt_);
    history_.insert(history_.end(), static_cast<size_t>(n), kEmbeddingToken);
    push_positions(n, start + static_cast<int32_t>(n));
}

void LlmSession::eval_media(const float* embd, int64_t n, const MediaGrid& grid, bool video, int merge,
                            float tokens_per_second, TextAfterMedia rule, std::vector<float>* all_out) {
    const LlmConfig& c = model_->config();
    if (c.n_pos_axes == 1) return eval_embd(embd, n, all_out);
    if (n <= 0) return;
    if (n_past() + n > n_ctx()) {
        throw BudgetError("context is full: " + std::to_string(n_past()) + " + " + std::to_string(n) +
                          " embeddings exceed n_ctx=" + std::to_string(n_ctx()));
    }
    // The run followed by one text token: that token's position is where text continues.
    std::vector<TokenKind> kinds(static_cast<size_t>(n) + 1, video ? TokenKind::Video : TokenKind::Image);
    kinds.back() = TokenKind::Text;
    std::vector<int32_t> rel(3 * (static_cast<size_t>(n) + 1));  // [3, n + 1]
    try {
        mrope_positions(kinds.data(), n + 1, &grid, 1, merge, tokens_per_second, rule, rel.data());
    } catch (const std::invalid_argument& e) {
        throw Error(std::string("media positions: ") + e.what());
    }
    const int32_t start = next_position();
    std::vector<int32_t> pos(3 * static_cast<size_t>(n));  // [3, n]
    for (int a = 0; a < 3; ++a) {
        for (int64_t i = 0; i < n; ++i) pos[a * n + i] = start + rel[a * (n + 1) + i];
    }
    const int64_t E = c.n_embd;
    eval_rows_at(*ctx_, E, c.n_vocab, n, opt_.n_batch, 3, pos.data(),
                 [&](int64_t b, int64_t m, float* x) { std::memcpy(x, embd + b * E, sizeof(float) * m * E); },
                 last_logits_, all_out, &interrupt_);
    history_.insert(history_.end(), static_cast<size_t>(n), kEmbeddingToken);
    push_positions(n, start + rel[n]);
}

void LlmSession::push_positions(int64_t n, int32_t next_after_last) {
    // Inside a media run the next position is not defined (nothing continues mid-run); the run's last
    // token carries where text goes on.
    const int32_t first = next_position();
    for (int64_t i = 0; i + 1 < n; ++i) next_pos_.push_back(first + static_cast<int32_t>(i) + 1);
    next_pos_.push_back(next_after_last);
}

int32_t LlmSession::sample(Sampler& s) {
    std::vector<float> logits = last_logits_;  // penalties modify a copy
    return s.sample(logits.data(), static_cast<int32_t>(logits.size()), history_.data(), n_past());
}

void LlmSession::truncate(int64_t n) {
    if (n < 0 || n > n_past()) throw Error("truncate: n out of range");
    ctx_->truncate(n);
    history_.resize(static_cast<size_t>(n));
    next_pos_.resize(static_cast<size_t>(n));
}

}  // namespace x2l
