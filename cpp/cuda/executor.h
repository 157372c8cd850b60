// The decoder LLM's CUDA executor (llm/executor.h): the weights on one device (CudaLlm) and the three
// kinds of work on top of them: a chat context (CudaContext), the X²L prefill (CudaPrefill) and the X²L
// mixed cache (CudaMixedCache). backends.cpp makes it, with the CPU executor beside it for what does
// not fit the device.
#pragma once
#include <memory>

#include "cuda/llm.h"
#include "llm/executor.h"

namespace x2l {

class CudaLlmExecutor final : public LlmExecutor {
  public:
    // Uploads the model's weights to opt.device (Error for layouts the kernels do not read, BudgetError
    // when the device is too small).
    CudaLlmExecutor(const LlmModel& model, const SessionOptions& opt);

    const char* backend() const override { return "cuda"; }
    std::string device_name() const override { return llm_->device_name(); }
    size_t device_bytes() const override { return llm_->weight_bytes(); }
    size_t workspace_bytes() const override { return 0; }
    std::unique_ptr<LlmContext> new_context(int64_t n_ctx) override;
    std::unique_ptr<PrefillRunner> new_prefill(int64_t low_cache_bytes) override;
    std::unique_ptr<MixedCache> new_mixed_cache(const TieredRows& rows, const MixedCacheLayout& compact_only,
                                                int64_t max_tail, std::string& note) override;

  private:
    SessionOptions opt_;
    std::unique_ptr<CudaLlm> llm_;
};

}  // namespace x2l
