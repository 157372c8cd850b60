#include "cuda/executor.h"

#include "cuda/mixed_cache.h"
#include "cuda/prefill.h"

namespace x2l {

namespace {

// The session's chat context: one f16 KV cache on the device.
class CudaChatContext final : public LlmContext {
  public:
    CudaChatContext(const CudaLlm& llm, int64_t n_ctx, int64_t n_batch, bool graphs) : ctx_(llm, n_ctx, n_batch) {
        ctx_.set_graphs(graphs);
    }
    void forward(const float* x, int64_t n, const int32_t* pos, int64_t n_logits, float* logits) override {
        ctx_.forward(x, n, pos, n_logits, logits);
    }
    int64_t size() const override { return ctx_.n_past(); }
    void truncate(int64_t n) override { ctx_.truncate(n); }
    size_t kv_bytes() const override { return ctx_.kv_bytes(); }
    size_t device_bytes() const override { return ctx_.device_bytes(); }
    GraphStats graph_stats() const override { return ctx_.graph_stats(); }

  private:
    CudaContext ctx_;
};

}  // namespace

CudaLlmExecutor::CudaLlmExecutor(const LlmModel& model, const SessionOptions& opt)
    : opt_(opt), llm_(new CudaLlm(model, opt.device)) {}

std::unique_ptr<LlmContext> CudaLlmExecutor::new_context(int64_t n_ctx) {
    return std::unique_ptr<LlmContext>(new CudaChatContext(*llm_, n_ctx, opt_.n_batch, opt_.cuda_graphs));
}

std::unique_ptr<PrefillRunner> CudaLlmExecutor::new_prefill(int64_t low_cache_bytes) {
    return std::unique_ptr<PrefillRunner>(new CudaPrefill(*llm_, opt_.n_batch, low_cache_bytes, interrupt()));
}

std::unique_ptr<MixedCache> CudaLlmExecutor::new_mixed_cache(const TieredRows& rows, const MixedCacheLayout& compact_only,
                                                             int64_t max_tail, std::string&) {
    return std::unique_ptr<MixedCache>(
        new CudaMixedCache(*llm_, rows, compact_only, max_tail, opt_.n_batch, opt_.cuda_graphs));
}

}  // namespace x2l
