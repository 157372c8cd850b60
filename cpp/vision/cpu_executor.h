// The CPU backend of the vision towers: VisionEncoder::encode / QwenVisionEncoder::encode on a thread pool.
#pragma once
#include "core/threadpool.h"
#include "vision/executor.h"

namespace x2l {

class CpuVisionExecutor final : public VisionExecutor {
  public:
    // enc and pool must outlive the executor.
    CpuVisionExecutor(VisionEncoder& enc, ThreadPool& pool) : enc_(enc), pool_(pool) {}
    void encode(const float* pixels, int64_t n_frames, float* out, VisionEncoder::Stage stage,
                const Interrupt* interrupt) override {
        enc_.encode(pool_, pixels, n_frames, out, stage, interrupt);
    }
    int batch_frames() const override { return enc_.batch_frames(); }
    void set_batch_frames(int n) override { enc_.set_batch_frames(n); }
    std::string device() const override { return "cpu"; }

  private:
    VisionEncoder& enc_;
    ThreadPool& pool_;
};

class CpuQwenVisionExecutor final : public QwenVisionExecutor {
  public:
    // enc and pool must outlive the executor.
    CpuQwenVisionExecutor(const QwenVisionEncoder& enc, ThreadPool& pool) : enc_(enc), pool_(pool) {}
    void encode(const float* frames, int64_t n_frames, int height, int width, float* out,
                const Interrupt* interrupt) override {
        enc_.encode(pool_, frames, n_frames, height, width, out, interrupt);
    }
    std::string device() const override { return "cpu"; }

  private:
    const QwenVisionEncoder& enc_;
    ThreadPool& pool_;
};

}  // namespace x2l
