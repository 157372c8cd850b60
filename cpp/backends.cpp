#include "backends.h"

#include "core/common.h"
#include "llm/cpu_executor.h"
#include "vision/cpu_executor.h"

// The CUDA backend, when this build has it: the only place in the code that asks.
#ifdef X2L_HAVE_CUDA
#include "cuda/backend.h"
#include "cuda/executor.h"
#include "cuda/vision.h"

namespace x2l::cuda {
constexpr bool kBuilt = true;
std::unique_ptr<LlmExecutor> llm(const LlmModel& model, const SessionOptions& opt) {
    if (opt.kv_type != DType::F16) throw Error("the CUDA backend keeps an f16 KV cache; use kv_type='f16'");
    return std::unique_ptr<LlmExecutor>(new CudaLlmExecutor(model, opt));
}
std::unique_ptr<VisionExecutor> vision(VisionEncoder& enc, int device) {
    return std::unique_ptr<VisionExecutor>(new CudaVision(enc, device));
}
int device_count() { return cuda_device_count(); }
std::string probe_error() { return cuda_probe_error(); }
std::string unusable(int index) { return cuda_device_unusable(index); }
DeviceInfo device_info(int index) {
    const CudaDeviceInfo c = cuda_device_info(index);
    DeviceInfo d;
    d.name = c.name;
    d.total_mem = c.total_mem;
    d.free_mem = c.free_mem;
    d.cc_major = c.cc_major;
    d.cc_minor = c.cc_minor;
    d.integrated = c.integrated;
    d.can_map_host_memory = c.can_map_host_memory;
    d.multiprocessors = c.multiprocessors;
    return d;
}
}  // namespace x2l::cuda
#else
namespace x2l::cuda {
constexpr bool kBuilt = false;
std::unique_ptr<LlmExecutor> llm(const LlmModel&, const SessionOptions&) {
    throw Error("this build of x2l-edge has no CUDA backend (it was built without nvcc); use device='cpu'");
}
std::unique_ptr<VisionExecutor> vision(VisionEncoder&, int) { throw Error("this build has no CUDA backend"); }
int device_count() { return 0; }
std::string probe_error() { return "this build has no CUDA backend"; }
std::string unusable(int) { return "this build has no CUDA backend"; }
DeviceInfo device_info(int) { throw Error("CUDA backend not built"); }
}  // namespace x2l::cuda
#endif

namespace x2l {

namespace {

// An X²L prefill on a device that goes on on the CPU once the device is full (the H tier grows with
// every chunk); the index lives on the host, so the CPU needs nothing from the device.
class PrefillWithFallback final : public PrefillRunner {
  public:
    PrefillWithFallback(std::unique_ptr<PrefillRunner> device, std::unique_ptr<PrefillRunner> cpu)
        : device_(std::move(device)), cpu_(std::move(cpu)) {}

    void run(const PrefillLevel& level, KVCache& work) override {
        if (device_) {
            try {
                device_->run(level, work);
                return;
            } catch (const BudgetError& e) {
                last_ = device_->device_stats();
                device_.reset();  // frees what it holds on the device
                note_ = std::string("the prefill does not fit the device (") + e.what() + "); continuing on the CPU";
                work.clear();
            }
        }
        cpu_->run(level, work);
    }
    bool on_device() const override { return device_ != nullptr; }
    PrefillDeviceStats device_stats() const override { return device_ ? device_->device_stats() : last_; }
    const std::string& note() const override { return note_; }

  private:
    std::unique_ptr<PrefillRunner> device_, cpu_;
    PrefillDeviceStats last_;  // the device's figures when it gave up
    std::string note_;
};

// A device's executor with the CPU's beside it: contexts on the device; an X²L prefill that falls back
// to the CPU; a mixed cache on the CPU when the device cannot hold the index.
class DeviceExecutor final : public LlmExecutor {
  public:
    DeviceExecutor(std::unique_ptr<LlmExecutor> device, std::unique_ptr<LlmExecutor> cpu)
        : device_(std::move(device)), cpu_(std::move(cpu)) {}

    const char* backend() const override { return device_->backend(); }
    std::string device_name() const override { return device_->device_name(); }
    size_t device_bytes() const override { return device_->device_bytes(); }
    size_t workspace_bytes() const override { return cpu_->workspace_bytes(); }
    std::unique_ptr<LlmContext> new_context(int64_t n_ctx) override { return device_->new_context(n_ctx); }
    // What the two make polls the session's interrupt (the device's runners, and the CPU's when they take over).
    void set_interrupt(const Interrupt* interrupt) override {
        LlmExecutor::set_interrupt(interrupt);
        device_->set_interrupt(interrupt);
        cpu_->set_interrupt(interrupt);
    }
    std::unique_ptr<PrefillRunner> new_prefill(int64_t low_cache_bytes) override {
        return std::unique_ptr<PrefillRunner>(
            new PrefillWithFallback(device_->new_prefill(low_cache_bytes), cpu_->new_prefill(low_cache_bytes)));
    }
    std::unique_ptr<MixedCache> new_mixed_cache(const TieredRows& rows, const MixedCacheLayout& compact_only,
                                                int64_t max_tail, std::string& note) override {
        try {
            return device_->new_mixed_cache(rows, compact_only, max_tail, note);
        } catch (const BudgetError& e) {  // device or pinned memory too small for this index
            note = std::string("the index does not fit the device (") + e.what() + "); decoding on the CPU";
            return cpu_->new_mixed_cache(rows, compact_only, max_tail, note);
        }
    }

  private:
    std::unique_ptr<LlmExecutor> device_, cpu_;
};

}  // namespace

std::unique_ptr<LlmExecutor> make_llm_executor(const LlmModel& model, ThreadPool& pool, const SessionOptions& opt) {
    std::unique_ptr<LlmExecutor> cpu(new CpuLlmExecutor(model, pool, opt));
    if (opt.device < 0) return cpu;
    if (model.config().n_pos_axes > 1) {  // Error, not FormatError: device='auto' then runs the CPU backend
        throw Error("the CUDA backend has no M-RoPE kernels (" + model.config().arch + "); run it with device='cpu'");
    }
    return std::unique_ptr<LlmExecutor>(new DeviceExecutor(cuda::llm(model, opt), std::move(cpu)));
}

std::unique_ptr<VisionExecutor> make_vision_executor(VisionEncoder& enc, ThreadPool& pool, int device) {
    if (device < 0) return std::unique_ptr<VisionExecutor>(new CpuVisionExecutor(enc, pool));
    if (enc.config().projector != ProjectorKind::Mlp || enc.config().post_norm) {
        // Error, not FormatError: Session then encodes frames on the CPU (x2l_edge/device.py open_vision)
        throw Error("the CUDA backend has no pixel-shuffle connector kernels (idefics3, internvl); the tower runs on the CPU");
    }
    return cuda::vision(enc, device);
}

// ---------------------------------------------------------------- what this build and machine have

bool cuda_built() { return cuda::kBuilt; }
bool cuda_emulated() { return X2L_CUDA_EMULATED != 0; }
int cuda_devices() { return cuda::device_count(); }
std::string cuda_why_no_device() { return cuda::probe_error(); }
std::string cuda_why_unusable(int index) { return cuda::unusable(index); }
DeviceInfo cuda_device(int index) { return cuda::device_info(index); }

}  // namespace x2l
