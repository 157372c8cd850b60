#include "llm/session.h"

#include <algorithm>
#include <cstring>

#include "cpu/features.h"
#include "core/common.h"
#ifdef X2L_HAVE_CUDA
#include "cuda/llm.h"
#endif

namespace x2l {

#ifdef X2L_HAVE_CUDA
struct CudaSessionState {
    std::unique_ptr<CudaLlm> llm;
    std::unique_ptr<CudaContext> ctx;  // the session's own chat context
};
#else
struct CudaSessionState {};
#endif

void CudaSessionStateDeleter::operator()(CudaSessionState* p) const { delete p; }

LlmSession::LlmSession(const std::string& path, const SessionOptions& opt) : opt_(opt) {
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
    if (opt_.device >= 0) {
#ifdef X2L_HAVE_CUDA
        if (opt_.kv_type != DType::F16) throw Error("the CUDA backend keeps an f16 KV cache; use kv_type='f16'");
        cuda_.reset(new CudaSessionState);
        cuda_->llm.reset(new CudaLlm(*model_, opt_.device));
        cuda_->ctx.reset(new CudaContext(*cuda_->llm, opt_.n_ctx, opt_.n_batch));
        cuda_->ctx->set_graphs(opt_.cuda_graphs);
#else
        throw Error("this build of x2l-edge has no CUDA backend (it was built without nvcc); use device='cpu'");
#endif
    }
    // With a device the CPU cache only serves as the token-history twin and holds one entry.
    cache_.reset(new KVCache(opt_.kv_type, c.n_layer, c.n_head_kv, c.head_dim, cuda_ ? 1 : opt_.n_ctx));
    last_logits_.assign(c.n_vocab, 0.0f);
}

LlmSession::~LlmSession() = default;

const CudaLlm* LlmSession::cuda() const {
#ifdef X2L_HAVE_CUDA
    if (cuda_) return cuda_->llm.get();
#endif
    return nullptr;
}

size_t LlmSession::kv_bytes() const {
#ifdef X2L_HAVE_CUDA
    if (cuda_) return cuda_->ctx->kv_bytes();
#endif
    return cache_->tail_bytes();
}

size_t LlmSession::device_bytes() const {
#ifdef X2L_HAVE_CUDA
    if (cuda_) return cuda_->llm->weight_bytes() + cuda_->ctx->device_bytes();
#endif
    return 0;
}

CudaGraphStats LlmSession::graph_stats() const {
#ifdef X2L_HAVE_CUDA
    if (cuda_) return cuda_->ctx->graph_stats();
#endif
    return CudaGraphStats();
}

std::string LlmSession::device_name() const {
#ifdef X2L_HAVE_CUDA
    if (cuda_) return cuda_->llm->device_name();
#endif
    return "cpu";
}

void run_tokens(const LlmModel& model, ThreadPool& pool, Workspace& ws, KVCache& cache,
                const std::vector<int32_t>& tokens, int32_t start_pos, int64_t n_batch,
                std::vector<float>& last_logits, std::vector<float>* all_out, const ForwardHooks* hooks) {
    const LlmConfig& c = model.config();
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (n == 0) return;
    for (int32_t t : tokens) {
        if (t < 0 || t >= c.n_vocab) throw Error("token id " + std::to_string(t) + " is out of range");
    }
    if (all_out) all_out->resize(static_cast<size_t>(n) * c.n_vocab);
    last_logits.resize(c.n_vocab);
    std::vector<float> x;
    std::vector<int32_t> pos;
    const int64_t entries_before = cache.size();
    try {
        for (int64_t b = 0; b < n; b += n_batch) {
            const int64_t m = std::min(n_batch, n - b);
            x.resize(static_cast<size_t>(m) * c.n_embd);
            model.embed(tokens.data() + b, m, x.data());
            pos.resize(m);
            for (int64_t i = 0; i < m; ++i) pos[i] = static_cast<int32_t>(start_pos + b + i);
            const bool last = b + m == n;
            if (all_out) {
                model.forward(pool, ws, x.data(), m, pos.data(), cache, m, all_out->data() + b * c.n_vocab, hooks);
                if (last) std::memcpy(last_logits.data(), all_out->data() + (n - 1) * c.n_vocab, sizeof(float) * c.n_vocab);
            } else {
                model.forward(pool, ws, x.data(), m, pos.data(), cache, last ? 1 : 0, last_logits.data(), hooks);
            }
        }
    } catch (...) {
        cache.truncate(entries_before);
        throw;
    }
}

void LlmSession::eval(const std::vector<int32_t>& tokens, std::vector<float>* all_out) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (n == 0) return;
    if (n_past() + n > n_ctx()) {
        throw BudgetError("context is full: " + std::to_string(n_past()) + " + " + std::to_string(n) +
                          " tokens exceed n_ctx=" + std::to_string(n_ctx()));
    }
#ifdef X2L_HAVE_CUDA
    if (cuda_) {
        cuda_->ctx->eval_tokens(*model_, tokens, last_logits_, all_out);
        history_.insert(history_.end(), tokens.begin(), tokens.end());
        return;
    }
#endif
    run_tokens(*model_, *pool_, ws_, *cache_, tokens, static_cast<int32_t>(n_past()), opt_.n_batch, last_logits_,
               all_out, nullptr);
    history_.insert(history_.end(), tokens.begin(), tokens.end());
}

void LlmSession::eval_embd(const float* embd, int64_t n, std::vector<float>* all_out) {
    const LlmConfig& c = model_->config();
    if (n <= 0) return;
    if (n_past() + n > n_ctx()) {
        throw BudgetError("context is full: " + std::to_string(n_past()) + " + " + std::to_string(n) +
                          " embeddings exceed n_ctx=" + std::to_string(n_ctx()));
    }
#ifdef X2L_HAVE_CUDA
    if (cuda_) {
        cuda_->ctx->eval(embd, n, last_logits_, all_out);
        history_.insert(history_.end(), static_cast<size_t>(n), kEmbeddingToken);
        return;
    }
#endif
    if (all_out) all_out->resize(static_cast<size_t>(n) * c.n_vocab);
    const int64_t start = n_past();
    const int64_t entries_before = cache_->size();
    std::vector<int32_t> pos;
    try {
        for (int64_t b = 0; b < n; b += opt_.n_batch) {
            const int64_t m = std::min(opt_.n_batch, n - b);
            x_.assign(embd + b * c.n_embd, embd + (b + m) * c.n_embd);
            pos.resize(m);
            for (int64_t i = 0; i < m; ++i) pos[i] = static_cast<int32_t>(start + b + i);
            const bool last = b + m == n;
            float* out = all_out ? all_out->data() + b * c.n_vocab : last_logits_.data();
            model_->forward(*pool_, ws_, x_.data(), m, pos.data(), *cache_, all_out ? m : (last ? 1 : 0), out);
            if (all_out && last) std::memcpy(last_logits_.data(), all_out->data() + (n - 1) * c.n_vocab, sizeof(float) * c.n_vocab);
        }
    } catch (...) {
        cache_->truncate(entries_before);
        throw;
    }
    history_.insert(history_.end(), static_cast<size_t>(n), kEmbeddingToken);
}

int32_t LlmSession::sample(Sampler& s) {
    std::vector<float> logits = last_logits_;  // penalties modify a copy
    return s.sample(logits.data(), static_cast<int32_t>(logits.size()), history_.data(), n_past());
}

void LlmSession::truncate(int64_t n) {
    if (n < 0 || n > n_past()) throw Error("truncate: n out of range");
#ifdef X2L_HAVE_CUDA
    if (cuda_) cuda_->ctx->truncate(n);
#endif
    if (!cuda_) cache_->truncate(n);  // (with a device the one-entry CPU cache is never filled)
    history_.resize(static_cast<size_t>(n));
}

}  // namespace x2l
