// LlmSession: one loaded model (mmap'd GGUF, weights, tokenizer), a thread pool, the executor of the
// backend it runs on (given by the caller's factory: backends.cpp), its KV cache and the token
// history it holds. The Python Session builds its friendly API on top of this.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/gguf.h"
#include "core/interrupt.h"
#include "core/threadpool.h"
#include "cpu/mrope.h"
#include "llm/executor.h"
#include "llm/model.h"
#include "llm/sampler.h"
#include "llm/tokenizer.h"

namespace x2l {

// The input embeddings of tokens [n, n_embd] (Error naming an out-of-range id).
std::vector<float> embed_tokens(const LlmModel& model, const std::vector<int32_t>& tokens);

class LlmSession {
  public:
    LlmSession(const std::string& path, const SessionOptions& opt, const LlmExecutorFactory& make_executor);
    ~LlmSession();

    const GGUFFile& file() const { return *file_; }
    const LlmModel& model() const { return *model_; }
    const Tokenizer& tokenizer() const { return *tokenizer_; }
    const SessionOptions& options() const { return opt_; }
    int n_threads() const { return pool_->n_threads(); }

    // Appends tokens to the context (in n_batch pieces). Returns logits of the last token in
    // last_logits(); when all_logits is set, every token's logits are written to all_out [n, n_vocab].
    void eval(const std::vector<int32_t>& tokens, std::vector<float>* all_out = nullptr);
    const std::vector<float>& last_logits() const { return last_logits_; }
    // Appends input embeddings embd [n, n_embd] (e.g. projected video features); they count in the
    // history as kEmbeddingToken so prefix reuse never matches them.
    void eval_embd(const float* embd, int64_t n, std::vector<float>* all_out = nullptr);
    static constexpr int32_t kEmbeddingToken = -1;
    // Appends the embeddings of one image or video run, embd [n, n_embd], n = grid.t * grid.h * grid.w /
    // merge^2 in the vision tower's order. An M-RoPE model places them at 3-D positions from the current
    // position (transformers' get_rope_index; Qwen2.5 videos scale time by tokens_per_second) and text
    // continues as `rule` says; any other model takes them at consecutive positions like eval_embd.
    void eval_media(const float* embd, int64_t n, const MediaGrid& grid, bool video, int merge,
                    float tokens_per_second, TextAfterMedia rule, std::vector<float>* all_out = nullptr);
    // Position of the next token (n_past() unless media moved it, M-RoPE).
    int32_t next_position() const { return next_pos_.empty() ? 0 : next_pos_.back(); }
    // Samples the next token from the last logits, using the token history for penalties.
    int32_t sample(Sampler& s);

    const std::vector<int32_t>& history() const { return history_; }
    int64_t n_past() const { return static_cast<int64_t>(history_.size()); }
    int64_t n_ctx() const { return opt_.n_ctx; }
    void truncate(int64_t n);  // keep the first n tokens of the context

    // Where the model runs (the X²L prefill and decoder get their runners from it too).
    LlmExecutor& executor() { return *executor_; }
    const LlmExecutor& executor() const { return *executor_; }
    size_t kv_bytes() const { return ctx_->kv_bytes(); }
    std::string device_name() const { return executor_->device_name(); }  // "cpu" or the device's name
    size_t device_bytes() const { return executor_->device_bytes() + ctx_->device_bytes(); }
    GraphStats graph_stats() const { return ctx_->graph_stats(); }  // the chat context's CUDA graph use
    // The CPU threads, also for the X²L scorers.
    ThreadPool& pool() { return *pool_; }
    size_t workspace_bytes() const { return executor_->workspace_bytes(); }

    // Concurrency: one call at a time per session. Everything that runs on it (this class, the X²L
    // prefill and decoder, the scorers) shares its executor's workspace and thread pool, so callers
    // hold mutex() around each call (the bindings do, with the GIL released); different sessions run
    // in parallel.
    std::mutex& mutex() const { return mutex_; }
    // Cancellation of the running call (any thread, no lock): long calls stop within one layer's work
    // and throw Cancelled, leaving the context as before the call. Requested between two calls, the
    // next call throws; the bindings clear it once a call has thrown (and the Python Session when an
    // operation starts).
    Interrupt& interrupt() { return interrupt_; }
    void cancel() { interrupt_.request(); }
    void clear_cancel() { interrupt_.clear(); }

  private:
    SessionOptions opt_;
    std::unique_ptr<GGUFFile> file_;
    std::unique_ptr<LlmModel> model_;
    std::unique_ptr<Tokenizer> tokenizer_;
    std::unique_ptr<ThreadPool> pool_;
    std::unique_ptr<LlmExecutor> executor_;
    std::unique_ptr<LlmContext> ctx_;
    std::vector<float> last_logits_;
    std::vector<int32_t> history_;
    std::vector<int32_t> next_pos_;  // per history token: the position the token after it takes
    void push_positions(int64_t n, int32_t next_after_last);
    mutable std::mutex mutex_;
    Interrupt interrupt_;
};

}  // namespace x2l
