// The backends this build has, and the one place that picks one: backends.cpp holds the only
// X2L_HAVE_CUDA of the code. Everything above (llm/session, x2l/, the bindings) gets executors from
// here and never learns which backend runs them.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

#include "llm/executor.h"
#include "vision/executor.h"

namespace x2l {

// ---------------------------------------------------------------- executors

// The session's LLM executor (an LlmExecutorFactory): the CPU for opt.device < 0; otherwise that CUDA
// device, with the CPU executor beside it for what does not fit the device (an X²L prefill that fills
// it goes on on the CPU, an index it cannot hold is decoded on the CPU; each says so in its note).
// Error when the build has no CUDA backend or the device cannot serve the model (kv_type other than f16,
// weight types its kernels do not read), BudgetError when the weights do not fit.
std::unique_ptr<LlmExecutor> make_llm_executor(const LlmModel& model, ThreadPool& pool, const SessionOptions& opt);

// The vision tower on the CPU (device < 0) or a CUDA device (Error / BudgetError as above). enc and
// pool must outlive the executor.
std::unique_ptr<VisionExecutor> make_vision_executor(VisionEncoder& enc, ThreadPool& pool, int device);
// Qwen2-VL / Qwen2.5-VL's tower, the same way.
std::unique_ptr<QwenVisionExecutor> make_qwen_vision_executor(const QwenVisionEncoder& enc, ThreadPool& pool, int device);

// ---------------------------------------------------------------- what this build and machine have

bool cuda_built();     // the CUDA backend was compiled in
bool cuda_emulated();  // ... against the CPU emulator of tests/cuda_emu (a test build, not a GPU)
int cuda_devices();    // CUDA devices the driver reports (0 without the backend, a driver or a device; never throws)
std::string cuda_why_no_device();          // why cuda_devices() is 0 ("" when the driver answered)
std::string cuda_why_unusable(int index);  // "" once a kernel of this build ran on the device, else why not

struct DeviceInfo {
    std::string name;
    size_t total_mem = 0, free_mem = 0;  // bytes; free: MemAvailable of /proc/meminfo on integrated GPUs
    int cc_major = 0, cc_minor = 0;
    bool integrated = false;             // Jetson: host and device share one DRAM
    bool can_map_host_memory = false;
    int multiprocessors = 0;
};
DeviceInfo cuda_device(int index);  // Error when the backend is not built or the device does not exist

}  // namespace x2l
