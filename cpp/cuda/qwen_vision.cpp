#include "cuda/qwen_vision.h"

#include <algorithm>
#include <cstring>

#include "core/common.h"
#include "cpu/vision_layout.h"
#include "cuda/layer_gate.h"

namespace x2l {

namespace {
constexpr size_t kF32 = sizeof(float);

float* f32(const CudaDeviceBuffer& b) { return static_cast<float*>(b.data()); }
}  // namespace

CudaQwenVision::CudaQwenVision(const QwenVisionEncoder& enc, int device) : enc_(enc), cfg_(enc.config()), device_(device) {
    cuda_require_device(device);
    const QwenVisionConfig& c = cfg_;
    cuda_check_vision_head_dim(c.head_dim);
    cuda_set_device(device);
    stream_.reset(new CudaStream(true));
    size_t& total = weight_bytes_;
    patch_w_ = cuda_upload_weight(enc.patch_w_, "v.patch_embd.weight (+ .weight.1)", total);
    layers_.resize(enc.layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
        const QwenVisionLayer& L = enc.layers_[l];
        Layer& d = layers_[l];
        cuda_upload_vision_block(L, l, d, total);
        if (c.qwen25) {
            d.w_gate = cuda_upload_weight(L.w_gate, "v.blk." + std::to_string(l) + ".ffn_gate.weight", total);
            d.b_gate = cuda_upload_floats(L.b_gate, total);
        }
    }
    post_w_ = cuda_upload_floats(enc.post_w_, total);
    post_b_ = cuda_upload_floats(enc.post_b_, total);
    mm0_ = cuda_upload_weight(enc.mm0_, "mm.0.weight", total);
    mm0_b_ = cuda_upload_floats(enc.mm0_b_, total);
    mm2_ = cuda_upload_weight(enc.mm2_, "mm.2.weight", total);
    mm2_b_ = cuda_upload_floats(enc.mm2_b_, total);
}

size_t CudaQwenVision::device_bytes() const {
    size_t b = weight_bytes_;
    for (const CudaDeviceBuffer* p : activations(*this)) b += p->size();
    return b + static_cast<size_t>(segments_.size()) * sizeof(CudaKVSegment);
}

void CudaQwenVision::reserve(int64_t n) {
    if (n <= capacity_) return;
    const QwenVisionConfig& c = cfg_;
    stream_->synchronize();  // nothing in flight may still use the old buffers
    for (CudaDeviceBuffer* b : activations(*this)) *b = CudaDeviceBuffer();
    segments_ = CudaSegmentTable();  // it points into k_ / v_
    hp_ = wp_ = -1;
    capacity_ = 0;
    const int64_t W = c.width, F = c.n_ff, U = static_cast<int64_t>(c.merge) * c.merge;
    rows_ = CudaDeviceBuffer(n * patch_w_.n_in * kF32);
    pos_ = CudaDeviceBuffer(2 * n * sizeof(int32_t));
    for (CudaDeviceBuffer* b : {&x_, &xn_, &q_, &k_, &v_, &attn_}) *b = CudaDeviceBuffer(n * W * kF32);
    if (c.qwen25) gate_ = CudaDeviceBuffer(n * F * kF32);
    up_ = CudaDeviceBuffer(n * F * kF32);
    h1_ = CudaDeviceBuffer(n / U * U * W * kF32);
    h2_ = CudaDeviceBuffer(n / U * c.n_embd * kF32);
    capacity_ = n;
}

void CudaQwenVision::set_layout(int hp, int wp) {
    if (hp == hp_ && wp == wp_) return;
    const QwenVisionConfig& c = cfg_;
    const int64_t N = static_cast<int64_t>(hp) * wp, U = static_cast<int64_t>(c.merge) * c.merge, n_units = N / U;
    // Merge units in window-major order (Qwen2.5; identity for Qwen2-VL): a window is then one contiguous
    // range of rows, i.e. one KV segment.
    unit_order_.resize(n_units);
    window_start_.assign(1, 0);
    window_len_.assign(1, N);  // entry 0: the whole pair (full-attention blocks)
    if (c.qwen25) {
        const WindowLayout wl = qwen_windows(hp, wp, c.merge, c.window_size / (c.patch * c.merge));
        unit_order_ = wl.unit_order;
        int64_t start = 0;
        for (int32_t len : wl.window_tokens) {
            window_start_.push_back(start);
            window_len_.push_back(len);
            start += len;
        }
        if (start != N) throw Error("internal: Qwen attention windows do not cover the frame");
    } else {
        for (int64_t u = 0; u < n_units; ++u) unit_order_[u] = static_cast<int32_t>(u);
    }
    std::vector<int32_t> row(N), col(N);
    qwen_patch_coords(hp, wp, c.merge, row.data(), col.data());
    pos_host_.resize(2 * N);  // [2, N]: slot k * U + i is unit unit_order_[k]'s token i
    for (int64_t k = 0; k < n_units; ++k) {
        const int64_t u = unit_order_[k];
        for (int64_t i = 0; i < U; ++i) {
            pos_host_[k * U + i] = row[u * U + i];
            pos_host_[N + k * U + i] = col[u * U + i];
        }
    }
    const int64_t W = c.width, row_bytes = W * static_cast<int64_t>(kF32);
    std::vector<CudaKVSegment> segs(window_start_.size());
    for (size_t w = 0; w < segs.size(); ++w) {
        CudaKVSegment& s = segs[w];
        s.k = static_cast<const uint8_t*>(k_.data()) + window_start_[w] * row_bytes;
        s.v = static_cast<const uint8_t*>(v_.data()) + window_start_[w] * row_bytes;
        s.k_tok_stride = s.v_tok_stride = row_bytes;
        s.k_head_stride = s.v_head_stride = c.head_dim * static_cast<int64_t>(kF32);
        s.n_tokens = window_len_[w];
        s.k_type = s.v_type = static_cast<uint32_t>(DType::F32);
    }
    segments_.assign(segs, c.head_dim, stream_->handle());
    staging_.upload(pos_.data(), pos_host_.data(), pos_host_.size() * sizeof(int32_t), stream_->handle());
    hp_ = hp;
    wp_ = wp;
}

void CudaQwenVision::norm(const CudaDeviceBuffer& w, const CudaDeviceBuffer& b, const float* x, float* y, int64_t n) {
    if (b.size()) {
        cuda_layer_norm(x, f32(w), f32(b), y, n, cfg_.width, cfg_.eps, stream_->handle());
    } else {
        cuda_rms_norm(x, f32(w), y, n, cfg_.width, cfg_.eps, stream_->handle());
    }
}

void CudaQwenVision::encode(const float* frames, int64_t n_frames, int height, int width, float* out,
                            const Interrupt* interrupt) {
    const QwenVisionConfig& c = cfg_;
    const int side = c.patch * c.merge;
    if (n_frames < 1) throw Error("no frames to encode");
    if (height < side || width < side || height % side || width % side) {
        throw Error("frame size " + std::to_string(height) + "x" + std::to_string(width) + " is not a positive multiple of " +
                    std::to_string(side) + " (patch * merge): resize first");
    }
    cuda_set_device(device_);
    const int64_t plane = 3LL * height * width;
    const int64_t per_pair = (height / side) * static_cast<int64_t>(width / side);
    pair_host_.resize(static_cast<size_t>(c.temporal * plane));  // [temporal, 3, H, W]
    try {
        for (int64_t f0 = 0, t = 0; f0 < n_frames; f0 += c.temporal, ++t) {
            check_interrupt(interrupt);
            for (int j = 0; j < c.temporal; ++j) {  // an odd last frame (or an image) is repeated
                const int64_t src = std::min<int64_t>(f0 + j, n_frames - 1);
                std::memcpy(pair_host_.data() + j * plane, frames + src * plane, sizeof(float) * plane);
            }
            run_pair(pair_host_.data(), height, width, out + t * per_pair * c.n_embd, interrupt);
        }
    } catch (...) {
        // A cancel (or a failure) leaves work queued that reads the activations and the staged rows.
        try {
            stream_->synchronize();
        } catch (...) {
        }
        throw;
    }
}

void CudaQwenVision::run_pair(const float* pair, int height, int width, float* out, const Interrupt* interrupt) {
    const QwenVisionConfig& c = cfg_;
    void* s = stream_->handle();
    const int hp = height / c.patch, wp = width / c.patch;
    const int64_t N = static_cast<int64_t>(hp) * wp, W = c.width, F = c.n_ff, K = patch_w_.n_in, E = c.n_embd;
    const int64_t U = static_cast<int64_t>(c.merge) * c.merge, n_units = N / U;
    reserve(N);
    set_layout(hp, wp);

    // Pixel rows in slot order (a matmul is row-wise, so reordering its input reorders its output).
    std::vector<float> raster(static_cast<size_t>(N * K));
    qwen_patch_rows(pair, c.temporal, height, width, c.patch, c.merge, raster.data());
    rows_host_.resize(static_cast<size_t>(N * K));
    for (int64_t k = 0; k < n_units; ++k) {
        std::memcpy(rows_host_.data() + k * U * K, raster.data() + unit_order_[k] * U * K, sizeof(float) * U * K);
    }
    staging_.upload(rows_.data(), rows_host_.data(), rows_host_.size() * kF32, s);
    cuda_vision_linear(patch_w_, f32(rows_), N, f32(x_), CudaDeviceBuffer(), s);  // [N, W]: the Conv3D, no bias

    const RopeAxes& ra = enc_.rope_;
    const int32_t* pos = static_cast<const int32_t*>(pos_.data());
    CudaLayerGate gate(interrupt, s);
    for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& L = layers_[l];
        gate.before_layer(static_cast<int>(l));
        norm(L.ln1_w, L.ln1_b, f32(x_), f32(xn_), N);
        cuda_vision_linear(L.wq, f32(xn_), N, f32(q_), L.bq, s);
        cuda_vision_linear(L.wk, f32(xn_), N, f32(k_), L.bk, s);
        cuda_vision_linear(L.wv, f32(xn_), N, f32(v_), L.bv, s);
        cuda_rope_axes(f32(q_), f32(q_), pos, N, N, c.n_head, c.head_dim, W, ra.freq.data(), ra.axis.data(), ra.n_axes, s);
        cuda_rope_axes(f32(k_), f32(k_), pos, N, N, c.n_head, c.head_dim, W, ra.freq.data(), ra.axis.data(), ra.n_axes, s);
        // Qwen2.5: windowed blocks attend inside each window (segments 1..), every n_wa_pattern-th block and
        // every Qwen2-VL block over the whole pair (segment 0). Bidirectional.
        const bool full = !c.qwen25 || (static_cast<int>(l) + 1) % c.n_wa_pattern == 0;
        const size_t first = full ? 0 : 1, last = full ? 1 : window_start_.size();
        for (size_t w = first; w < last; ++w) {
            CudaAttentionParams p;
            p.q = f32(q_) + window_start_[w] * W;
            p.out = f32(attn_) + window_start_[w] * W;
            p.n_q = static_cast<int>(window_len_[w]);
            p.n_head = p.n_kv_head = c.n_head;
            p.head_dim = c.head_dim;
            p.causal = false;
            p.segments = segments_.device_data() + w;
            p.n_segments = 1;
            p.n_kv = window_len_[w];
            cuda_attention(p, s);
        }
        cuda_vision_linear(L.wo, f32(attn_), N, f32(xn_), L.bo, s);
        cuda_add(f32(x_), f32(xn_), f32(x_), N * W, N * W, s);
        norm(L.ln2_w, L.ln2_b, f32(x_), f32(xn_), N);
        if (c.qwen25) {  // SwiGLU: down(silu(gate(x)) * up(x))
            cuda_vision_linear(L.w_gate, f32(xn_), N, f32(gate_), L.b_gate, s);
            cuda_vision_linear(L.w_up, f32(xn_), N, f32(up_), L.b_up, s);
            cuda_swiglu(f32(gate_), f32(up_), f32(gate_), N * F, s);
            cuda_vision_linear(L.w_down, f32(gate_), N, f32(xn_), L.b_down, s);
        } else {
            cuda_vision_linear(L.w_up, f32(xn_), N, f32(up_), L.b_up, s);
            cuda_gelu(f32(up_), f32(up_), N * F, GeluMode::Quick, s);
            cuda_vision_linear(L.w_down, f32(up_), N, f32(xn_), L.b_down, s);
        }
        cuda_add(f32(x_), f32(xn_), f32(x_), N * W, N * W, s);
        gate.after_layer(static_cast<int>(l));
    }

    // Merger: norm, a merge unit's U rows side by side ([n_units, U * W] is the row-major view of [N, W]),
    // mm.0 -> GELU (erf) -> mm.2; slot k's token goes back to its raster unit on the host.
    norm(post_w_, post_b_, f32(x_), f32(xn_), N);
    cuda_vision_linear(mm0_, f32(xn_), n_units, f32(h1_), mm0_b_, s);
    cuda_gelu(f32(h1_), f32(h1_), n_units * U * W, GeluMode::Erf, s);
    cuda_vision_linear(mm2_, f32(h1_), n_units, f32(h2_), mm2_b_, s);  // [n_units, E]
    h2_host_.resize(static_cast<size_t>(n_units * E));
    h2_.download(h2_host_.data(), h2_host_.size() * kF32, 0, s);
    stream_->synchronize();  // kernel faults surface here; the host buffers are reused next pair
    for (int64_t k = 0; k < n_units; ++k) {
        std::memcpy(out + static_cast<int64_t>(unit_order_[k]) * E, h2_host_.data() + k * E, sizeof(float) * E);
    }
}

}  // namespace x2l
