// What the two CUDA vision towers (cuda/vision.h: SigLIP / CLIP / InternViT, cuda/qwen_vision.h: Qwen2-VL /
// Qwen2.5-VL) share: a pre-norm attention block's device weights and their upload, the attention kernel's
// head_dim limits, and the towers' matmul.
#pragma once
#include <cstdint>
#include <string>

#include "core/common.h"
#include "cuda/llm.h"

namespace x2l {

// One block's norms, attention and feed-forward projections in device memory (a tower adds its own fields).
struct CudaVisionBlock {
    CudaDeviceBuffer ln1_w, ln1_b, ln2_w, ln2_b;  // [width] each; the biases empty for RMSNorm
    CudaDeviceBuffer bq, bk, bv, bo, b_up, b_down;
    CudaMatrix wq, wk, wv, wo, w_up, w_down;
};

// Uploads block `layer` of a host tower (HostLayer: VisionLayer or QwenVisionLayer, which name these fields
// alike); an Error names the GGUF tensor the kernels cannot read.
template <class HostLayer>
void cuda_upload_vision_block(const HostLayer& L, size_t layer, CudaVisionBlock& d, size_t& total) {
    const std::string p = "v.blk." + std::to_string(layer) + ".";
    d.ln1_w = cuda_upload_floats(L.ln1_w, total);
    d.ln1_b = cuda_upload_floats(L.ln1_b, total);
    d.ln2_w = cuda_upload_floats(L.ln2_w, total);
    d.ln2_b = cuda_upload_floats(L.ln2_b, total);
    d.wq = cuda_upload_weight(L.wq, p + "attn_q.weight", total);
    d.wk = cuda_upload_weight(L.wk, p + "attn_k.weight", total);
    d.wv = cuda_upload_weight(L.wv, p + "attn_v.weight", total);
    d.wo = cuda_upload_weight(L.wo, p + "attn_out.weight", total);
    d.bq = cuda_upload_floats(L.bq, total);
    d.bk = cuda_upload_floats(L.bk, total);
    d.bv = cuda_upload_floats(L.bv, total);
    d.bo = cuda_upload_floats(L.bo, total);
    d.w_up = cuda_upload_weight(L.w_up, p + "ffn_up.weight", total);
    d.b_up = cuda_upload_floats(L.b_up, total);
    d.w_down = cuda_upload_weight(L.w_down, p + "ffn_down.weight", total);
    d.b_down = cuda_upload_floats(L.b_down, total);
}

// The CUDA attention kernel reads K/V rows of head_dim floats in float4 steps, up to 256.
inline void cuda_check_vision_head_dim(int head_dim) {
    if (head_dim % 4 != 0 || head_dim > 256) {
        throw Error("the CUDA attention kernel needs a vision head_dim % 4 == 0 and <= 256 (got " +
                    std::to_string(head_dim) + ")");
    }
}

// Every matmul of a tower runs on tensor cores (f16 operands, f32 sums), however many rows a call has: a
// frame's tokens then do not depend on the batch (or frame size) they were encoded with.
inline void cuda_vision_linear(const CudaMatrix& w, const float* x, int64_t n, float* y, const CudaDeviceBuffer& bias,
                               void* stream) {
    cuda_linear(w, x, n, y, bias, stream, MatmulKernel::TensorCore);
}

}  // namespace x2l
