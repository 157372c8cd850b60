// The decoder LLM on a CUDA device: weights uploaded once, an f16 KV cache in device memory, and the
// forward pass of LlmModel::forward built from the kernels of cuda_backend.h. LlmSession routes
// eval/eval_embd/truncate here when it was opened with a device; the token embedding stays on the
// host (one row per token is looked up there and uploaded with the batch).
//
// Defined only when the build has the CUDA backend (X2L_HAVE_CUDA=1).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda_backend.h"
#include "model.h"

namespace x2l {

class CudaLlm {
  public:
    // Uploads every weight of `model` to device `device`. Throws Error for weight or KV layouts the
    // kernels do not read (message names the tensor), BudgetError when device memory runs out.
    CudaLlm(const LlmModel& model, int device, int64_t n_ctx, int64_t n_batch);
    ~CudaLlm();
    CudaLlm(const CudaLlm&) = delete;
    CudaLlm& operator=(const CudaLlm&) = delete;

    // Runs n input embeddings x [n, n_embd] (host) at positions n_past().. in n_batch pieces,
    // appending their K/V; logits of the last n_logits rows go to logits [n_logits, n_vocab] (host).
    // On failure the cache is left as it was before the call.
    void forward(const float* x, int64_t n, int64_t n_logits, float* logits);
    int64_t n_past() const { return n_past_; }
    void truncate(int64_t n);  // keep the first n cache entries

    size_t weight_bytes() const { return weight_bytes_; }
    size_t kv_bytes() const;  // bytes of the cache entries in use
    size_t device_bytes() const;  // everything this object holds on the device
    const std::string& device_name() const { return name_; }

  private:
    struct DevWeight {
        CudaDeviceBuffer buf;
        DType type = DType::F32;
        int64_t n_in = 0, n_out = 0;
    };
    struct DevLayer {
        CudaDeviceBuffer attn_norm, ffn_norm, bq, bk, bv;  // f32; biases empty when absent
        DevWeight wq, wk, wv, wo, w_gate, w_up, w_down;
        CudaDeviceBuffer k, v;  // [n_ctx, n_head_kv, head_dim] f16, token-major
    };
    DevWeight upload(const Weight& w, const std::string& name);
    void matmul(const DevWeight& w, const float* x, int64_t n, float* y, const CudaDeviceBuffer& bias);
    void forward_batch(const float* x_host, int64_t n, int64_t n_logits, float* logits);

    LlmConfig cfg_;
    int device_ = 0;
    std::string name_;
    int64_t n_ctx_ = 0, n_batch_ = 0, n_past_ = 0;
    size_t weight_bytes_ = 0;
    std::vector<DevLayer> layers_;
    DevWeight output_;
    CudaDeviceBuffer output_norm_;
    // Activations for n_batch tokens.
    CudaDeviceBuffer x_, xn_, q_, k_, v_, attn_, gate_, up_, pos_, logits_, attn_ws_;
    std::vector<CudaSegmentTable> tables_;  // one per layer: the cache as one f16 segment
    std::unique_ptr<CudaStream> stream_;  // created after the device is selected
};

}  // namespace x2l
