// The CPU backend of the decoder LLM (llm/executor.h): LlmModel::forward over host KV caches, on the
// session's thread pool. Every segment a forward attends to is read where it lives; the X²L reload is a
// background thread copying the selected L rows layer by layer (cpu/reload.h).
#pragma once
#include <memory>

#include "llm/executor.h"
#include "llm/model.h"

namespace x2l {

class CpuLlmExecutor final : public LlmExecutor {
  public:
    // model and pool must outlive the executor and everything it makes.
    CpuLlmExecutor(const LlmModel& model, ThreadPool& pool, const SessionOptions& opt);

    const char* backend() const override { return "cpu"; }
    std::string device_name() const override { return "cpu"; }
    size_t device_bytes() const override { return 0; }
    size_t workspace_bytes() const override { return ws_.bytes(); }
    std::unique_ptr<LlmContext> new_context(int64_t n_ctx) override;
    std::unique_ptr<PrefillRunner> new_prefill(int64_t low_cache_bytes) override;
    std::unique_ptr<MixedCache> new_mixed_cache(const TieredRows& rows, const MixedCacheLayout& compact_only,
                                                int64_t max_tail, std::string& note) override;

  private:
    const LlmModel& model_;
    ThreadPool& pool_;
    SessionOptions opt_;
    Workspace ws_;  // shared by everything this executor makes (one forward at a time)
};

}  // namespace x2l
