// LlmSession: one loaded model (mmap'd GGUF, weights, tokenizer), a thread pool, a KV cache and
// the token history it holds. The Python Session builds its friendly API on top of this.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/backend.h"
#include "core/gguf.h"
#include "cpu/kv_cache.h"
#include "llm/model.h"
#include "llm/sampler.h"
#include "core/threadpool.h"
#include "llm/tokenizer.h"

namespace x2l {

class CudaLlm;
struct CudaSessionState;  // the device weights and this session's device context (session.cpp)
struct CudaSessionStateDeleter {
    void operator()(CudaSessionState* p) const;
};

struct SessionOptions {
    int n_threads = 0;        // 0: all hardware threads
    int64_t n_ctx = 0;        // 0: min(model's training context, 4096)
    DType kv_type = DType::F16;
    int64_t n_batch = 256;    // tokens per forward call during prompt processing
    int device = -1;          // CUDA device for eval/eval_embd (-1: the CPU backend)
    bool cuda_graphs = true;  // single-token device forwards replay a CUDA graph (CudaContext::set_graphs)
};


// Runs tokens through the model in n_batch pieces at positions start_pos.., appending to cache's
// tail; writes the last token's logits to last_logits and, if all_out, every token's logits.
void run_tokens(const LlmModel& model, ThreadPool& pool, Workspace& ws, KVCache& cache,
                const std::vector<int32_t>& tokens, int32_t start_pos, int64_t n_batch,
                std::vector<float>& last_logits, std::vector<float>* all_out, const ForwardHooks* hooks);

class LlmSession {
  public:
    LlmSession(const std::string& path, const SessionOptions& opt);
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
    // Samples the next token from the last logits, using the token history for penalties.
    int32_t sample(Sampler& s);

    const std::vector<int32_t>& history() const { return history_; }
    int64_t n_past() const { return static_cast<int64_t>(history_.size()); }
    int64_t n_ctx() const { return opt_.n_ctx; }
    void truncate(int64_t n);  // keep the first n tokens of the context

    size_t kv_bytes() const;
    // The device weights when the session was opened with a device (eval/eval_embd/truncate run
    // there, and X²L decoders answer there); null on the CPU backend. The X²L prefill and the
    // scorers use the CPU model through pool() and workspace().
    const CudaLlm* cuda() const;
    std::string device_name() const;  // "cpu" or the CUDA device's name
    size_t device_bytes() const;      // device memory held (weights, KV cache, work buffers); 0 on the CPU
    CudaGraphStats graph_stats() const;  // the device context's CUDA graph use (zeros on the CPU)
    // Shared compute resources for other users of the model (the X²L prefill and decoder).
    ThreadPool& pool() { return *pool_; }
    Workspace& workspace() { return ws_; }
    size_t workspace_bytes() const { return ws_.bytes(); }

  private:
    SessionOptions opt_;
    std::unique_ptr<GGUFFile> file_;
    std::unique_ptr<LlmModel> model_;
    std::unique_ptr<Tokenizer> tokenizer_;
    std::unique_ptr<ThreadPool> pool_;
    std::unique_ptr<KVCache> cache_;
    std::unique_ptr<CudaSessionState, CudaSessionStateDeleter> cuda_;
    Workspace ws_;
    std::vector<float> x_;  // [n_batch, n_embd] input embeddings
    std::vector<float> last_logits_;
    std::vector<int32_t> history_;
};

}  // namespace x2l
