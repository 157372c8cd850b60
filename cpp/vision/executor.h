// The vision tower's executor: what a backend implements to encode frames (the CPU: vision/cpu_executor.h,
// CUDA: cuda/vision.h; backends.cpp picks one). A new tower (issue 20: Qwen2-VL's, SmolVLM2's) adds its
// encoder and one executor per backend; nothing above the executor changes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "vision/qwen.h"
#include "vision/vision.h"

namespace x2l {

class VisionExecutor {
  public:
    virtual ~VisionExecutor() = default;
    // pixels [n_frames, 3, S, S] (host, resized and normalised) -> out (host) [n_frames *
    // rows_per_frame(stage), cols(stage)] (VisionEncoder::encode's contract). One call at a time.
    // interrupt (may be null; the session's, so that cancelling a video prefill also stops the frame
    // encoding it is waiting for) is polled as the LLM's executor does: the CPU before every layer of
    // every batch, a device between layers a little behind the work it has queued (Cancelled).
    virtual void encode(const float* pixels, int64_t n_frames, float* out, VisionEncoder::Stage stage,
                        const Interrupt* interrupt) = 0;
    virtual int batch_frames() const = 0;     // frames encoded together (bounds activation memory)
    virtual void set_batch_frames(int n) = 0;
    virtual std::string device() const = 0;   // "cpu" or "cuda:N"
    virtual size_t device_bytes() const { return 0; }  // weights + activations in device memory
};

// Qwen2-VL / Qwen2.5-VL's tower (frames of any size that is a multiple of patch * merge, paired in time):
// the CPU (vision/cpu_executor.h) or CUDA (cuda/qwen_vision.h).
class QwenVisionExecutor {
  public:
    virtual ~QwenVisionExecutor() = default;
    // QwenVisionEncoder::encode's contract: frames [n_frames, 3, height, width] (host) -> out (host)
    // [enc.n_tokens(n_frames, height, width), n_embd]. One call at a time; interrupt polled between blocks.
    virtual void encode(const float* frames, int64_t n_frames, int height, int width, float* out,
                        const Interrupt* interrupt) = 0;
    virtual std::string device() const = 0;  // "cpu" or "cuda:N"
    virtual size_t device_bytes() const { return 0; }
};

}  // namespace x2l
