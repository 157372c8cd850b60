#include "cuda/vision.h"

#include <algorithm>

#include "core/common.h"
#include "cuda/layer_gate.h"

namespace x2l {

namespace {
constexpr size_t kF32 = sizeof(float);

GeluMode gelu_mode(VisionAct a) {
    switch (a) {
        case VisionAct::GeluTanh: return GeluMode::Tanh;
        case VisionAct::QuickGelu: return GeluMode::Quick;
        case VisionAct::GeluErf: break;
    }
    return GeluMode::Erf;
}

const float* f32(const CudaDeviceBuffer& b) { return static_cast<const float*>(b.data()); }
float* f32(CudaDeviceBuffer& b) { return static_cast<float*>(b.data()); }
}  // namespace

CudaVision::CudaVision(const VisionEncoder& enc, int device, int batch_frames)
    : enc_(enc), cfg_(enc.config()), device_(device) {
    cuda_require_device(device);
    const VisionConfig& c = cfg_;
    cuda_check_vision_head_dim(c.head_dim);
    cuda_set_device(device);
    stream_.reset(new CudaStream(true));
    size_t& total = weight_bytes_;
    patch_w_ = cuda_upload_weight(enc.patch_w_, "v.patch_embd.weight", total);
    patch_b_ = cuda_upload_floats(enc.patch_b_, total);
    class_embd_ = cuda_upload_floats(enc.class_embd_, total);
    pos_embd_ = cuda_upload_floats(enc.pos_embd_, total);
    pre_ln_w_ = cuda_upload_floats(enc.pre_ln_w_, total);
    pre_ln_b_ = cuda_upload_floats(enc.pre_ln_b_, total);
    layers_.resize(enc.layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
        const VisionLayer& L = enc.layers_[l];
        Layer& d = layers_[l];
        cuda_upload_vision_block(L, l, d, total);
        d.ls1 = cuda_upload_floats(L.ls1, total);
        d.ls2 = cuda_upload_floats(L.ls2, total);
        d.q_norm = cuda_upload_floats(L.q_norm, total);
        d.k_norm = cuda_upload_floats(L.k_norm, total);
    }
    if (c.projector == ProjectorKind::PixelShuffle) {
        mm_fc_ = cuda_upload_weight(enc.mm_fc_, "mm.model.fc.weight", total);
    } else {
        mm0_ = cuda_upload_weight(enc.mm0_, "mm.0.weight", total);
        mm0_b_ = cuda_upload_floats(enc.mm0_b_, total);
        mm2_ = cuda_upload_weight(enc.mm2_, "mm.2.weight", total);
        mm2_b_ = cuda_upload_floats(enc.mm2_b_, total);
        mm_ln_w_ = cuda_upload_floats(enc.mm_ln_w_, total);  // internvl; empty otherwise
        mm_ln_b_ = cuda_upload_floats(enc.mm_ln_b_, total);
    }
    if (c.post_norm) {
        post_ln_w_ = cuda_upload_floats(enc.post_ln_w_, total);
        post_ln_b_ = cuda_upload_floats(enc.post_ln_b_, total);
    }
    allocate(batch_frames > 0 ? batch_frames : std::max(1, kBatchTokens / c.n_tokens));
}

void CudaVision::set_batch_frames(int n) {
    if (n < 1) throw Error("batch_frames must be >= 1");
    if (n != batch_) allocate(n);
}

void CudaVision::allocate(int batch) {
    const VisionConfig& c = cfg_;
    cuda_set_device(device_);
    stream_->synchronize();  // nothing in flight may still use the old buffers
    const int64_t B = batch, T = c.n_tokens, W = c.width, NF = c.n_feat, E = c.n_embd;
    const int64_t K = 3 * static_cast<int64_t>(c.patch_size) * c.patch_size;
    // Release the old set first so that a smaller batch fits where a larger one did not.
    for (CudaDeviceBuffer* b : activations(*this)) *b = CudaDeviceBuffer();
    frame_kv_ = CudaSegmentTable();
    batch_ = 0;
    patches_host_.assign(static_cast<size_t>(B * c.n_patches * K), 0.0f);
    patches_ = CudaDeviceBuffer(B * c.n_patches * K * kF32);
    for (CudaDeviceBuffer* b : {&x_, &xn_, &q_, &k_, &v_, &attn_}) *b = CudaDeviceBuffer(B * T * W * kF32);
    ff_ = CudaDeviceBuffer(B * T * c.n_ff * kF32);
    if (c.projector != ProjectorKind::Mlp) {
        shuffled_ = CudaDeviceBuffer(B * NF * W * kF32);  // the same values, regrouped
        if (NF != T) feat_ = CudaDeviceBuffer(B * NF * W * kF32);
        if (c.projector == ProjectorKind::ShuffleMlp) h1_ = CudaDeviceBuffer(B * c.tokens_per_frame * E * kF32);
        h2_ = CudaDeviceBuffer(B * c.tokens_per_frame * E * kF32);
    } else {
        if (NF != T) feat_ = CudaDeviceBuffer(B * NF * W * kF32);
        h1_ = CudaDeviceBuffer(B * NF * E * kF32);
        h2_ = CudaDeviceBuffer(B * NF * E * kF32);
    }
    if (c.pool != PoolMode::None) pooled_ = CudaDeviceBuffer(B * c.tokens_per_frame * E * kF32);
    // Segment b: frame b's keys and values, rows [b*T, (b+1)*T) of k_ / v_, heads side by side in a row.
    std::vector<CudaKVSegment> frames(static_cast<size_t>(B));
    const int64_t frame_bytes = T * W * static_cast<int64_t>(kF32);
    for (int64_t b = 0; b < B; ++b) {
        CudaKVSegment& seg = frames[b];
        seg.k = static_cast<const uint8_t*>(k_.data()) + b * frame_bytes;
        seg.v = static_cast<const uint8_t*>(v_.data()) + b * frame_bytes;
        seg.k_tok_stride = seg.v_tok_stride = W * static_cast<int64_t>(kF32);
        seg.k_head_stride = seg.v_head_stride = c.head_dim * static_cast<int64_t>(kF32);
        seg.n_tokens = T;
        seg.k_type = seg.v_type = static_cast<uint32_t>(DType::F32);
    }
    frame_kv_.assign(frames, c.head_dim, stream_->handle());
    stream_->synchronize();
    batch_ = batch;
}

size_t CudaVision::device_bytes() const {
    size_t b = weight_bytes_;
    for (const CudaDeviceBuffer* p : activations(*this)) b += p->size();
    return b + static_cast<size_t>(frame_kv_.size()) * sizeof(CudaKVSegment);
}

void CudaVision::run_tower(int64_t n, const Interrupt* interrupt) {
    const VisionConfig& c = cfg_;
    void* s = stream_->handle();
    const int64_t W = c.width, T = c.n_tokens, NP = c.n_patches, FF = c.n_ff, rows = n * T;

    // ---- patch embedding (conv as a matmul over im2col rows), positions, CLIP's CLS and pre-LN
    if (!c.has_cls) {
        cuda_vision_linear(patch_w_, f32(patches_), n * NP, f32(x_), patch_b_, s);  // [n * NP, W]: patches are the tokens
        cuda_add(f32(x_), f32(pos_embd_), f32(x_), rows * W, T * W, s);
    } else {
        cuda_vision_linear(patch_w_, f32(patches_), n * NP, f32(xn_), patch_b_, s);  // [n * NP, W]
        float* tok = f32(q_);                                                  // [n * T, W]: CLS, then the patches
        for (int64_t b = 0; b < n; ++b) {
            cuda_copy_d2d_async(tok + b * T * W, class_embd_.data(), W * kF32, s);
            cuda_copy_d2d_async(tok + (b * T + 1) * W, f32(xn_) + b * NP * W, NP * W * kF32, s);
        }
        cuda_add(tok, f32(pos_embd_), tok, rows * W, T * W, s);
        if (c.pre_norm) {
            cuda_layer_norm(tok, f32(pre_ln_w_), f32(pre_ln_b_), f32(x_), rows, W, c.eps, s);
        } else {  // InternViT: no pre-LN
            cuda_copy_d2d_async(x_.data(), tok, rows * W * kF32, s);
        }
    }

    // ---- encoder layers (pre-LN transformer)
    CudaLayerGate gate(interrupt, s);
    for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& L = layers_[l];
        gate.before_layer(static_cast<int>(l));
        block_norm(L.ln1_w, L.ln1_b, f32(x_), f32(xn_), rows);
        cuda_vision_linear(L.wq, f32(xn_), rows, f32(q_), L.bq, s);
        cuda_vision_linear(L.wk, f32(xn_), rows, f32(k_), L.bk, s);
        cuda_vision_linear(L.wv, f32(xn_), rows, f32(v_), L.bv, s);
        if (L.q_norm.size()) {  // InternViT-6B: RMSNorm of q and k over the whole width, before the heads split
            cuda_rms_norm(f32(q_), f32(L.q_norm), f32(xn_), rows, W, c.eps, s);
            cuda_copy_d2d_async(q_.data(), xn_.data(), rows * W * kF32, s);
            cuda_rms_norm(f32(k_), f32(L.k_norm), f32(xn_), rows, W, c.eps, s);
            cuda_copy_d2d_async(k_.data(), xn_.data(), rows * W * kF32, s);
        }
        // Full self-attention inside each frame: the n frames as n problems of one launch.
        CudaAttentionParams p;
        p.q = f32(q_);
        p.out = f32(attn_);
        p.q_batch_stride = p.out_batch_stride = T * W;
        p.n_batch = static_cast<int>(n);
        p.n_q = static_cast<int>(T);
        p.n_head = p.n_kv_head = c.n_head;
        p.head_dim = c.head_dim;
        p.causal = false;
        p.segments = frame_kv_.device_data();  // one segment per frame
        p.n_segments = 1;
        p.n_kv = T;
        cuda_attention(p, s);
        cuda_vision_linear(L.wo, f32(attn_), rows, f32(xn_), L.bo, s);
        residual(f32(x_), f32(xn_), L.ls1, rows);
        block_norm(L.ln2_w, L.ln2_b, f32(x_), f32(xn_), rows);
        cuda_vision_linear(L.w_up, f32(xn_), rows, f32(ff_), L.b_up, s);  // [rows, FF]
        cuda_gelu(f32(ff_), f32(ff_), rows * FF, gelu_mode(c.act), s);
        cuda_vision_linear(L.w_down, f32(ff_), rows, f32(xn_), L.b_down, s);
        residual(f32(x_), f32(xn_), L.ls2, rows);
        gate.after_layer(static_cast<int>(l));
    }
    if (c.post_norm) {  // idefics3: the post-LN on the last block's output, back into x_
        cuda_layer_norm(f32(x_), f32(post_ln_w_), f32(post_ln_b_), f32(xn_), rows, W, c.eps, s);
        cuda_copy_d2d_async(x_.data(), xn_.data(), rows * W * kF32, s);
    }
}

void CudaVision::block_norm(const CudaDeviceBuffer& w, const CudaDeviceBuffer& b, const float* x, float* y, int64_t rows) {
    if (cfg_.rms_norm) {
        cuda_rms_norm(x, f32(w), y, rows, cfg_.width, cfg_.eps, stream_->handle());
    } else {
        cuda_layer_norm(x, f32(w), f32(b), y, rows, cfg_.width, cfg_.eps, stream_->handle());
    }
}

void CudaVision::residual(float* x, float* y, const CudaDeviceBuffer& scale, int64_t rows) {
    const int64_t n = rows * cfg_.width;
    if (scale.size()) cuda_mul(y, f32(scale), y, n, cfg_.width, stream_->handle());
    cuda_add(x, y, x, n, n, stream_->handle());
}

void CudaVision::encode(const float* pixels, int64_t n_frames, float* out, VisionEncoder::Stage stage,
                        const Interrupt* interrupt) {
    try {
        encode_batches(pixels, n_frames, out, stage, interrupt);
    } catch (...) {
        // A cancel (or a failure) leaves work queued that reads the activations and the staged patches:
        // it must be done before the next call reuses them.
        try {
            stream_->synchronize();
        } catch (...) {
        }
        throw;
    }
}

void CudaVision::encode_batches(const float* pixels, int64_t n_frames, float* out, VisionEncoder::Stage stage,
                                const Interrupt* interrupt) {
    using Stage = VisionEncoder::Stage;
    const VisionConfig& c = cfg_;
    if (n_frames < 0) throw Error("n_frames must be >= 0");
    if (n_frames == 0) return;
    cuda_set_device(device_);
    void* s = stream_->handle();
    const int64_t W = c.width, T = c.n_tokens, E = c.n_embd, NF = c.n_feat, S = c.image_size, NP = c.n_patches;
    const int64_t K = 3 * static_cast<int64_t>(c.patch_size) * c.patch_size, TPF = c.tokens_per_frame;
    const int64_t frame_px = 3 * S * S;
    const int64_t first_feat = NF == T ? 0 : 1;  // CLS is token 0 when it is dropped

    for (int64_t f0 = 0; f0 < n_frames; f0 += batch_) {
        const int64_t n = std::min<int64_t>(batch_, n_frames - f0);
        check_interrupt(interrupt);
        const float* px = pixels + f0 * frame_px;
        for (int64_t r = 0; r < n * NP; ++r) enc_.im2col_row(px, r, patches_host_.data() + r * K);
        staging_.upload(patches_.data(), patches_host_.data(), n * NP * K * kF32, s);  // patches_host_ is free on return
        run_tower(n, interrupt);

        if (stage == Stage::Features) {
            for (int64_t b = 0; b < n; ++b)
                x_.download(out + (f0 + b) * NF * W, NF * W * kF32, (b * T + first_feat) * W * kF32, s);
            stream_->synchronize();
            continue;
        }
        if (c.projector != ProjectorKind::Mlp) {
            // [n * NF, W] (CLS dropped) -> [n * TPF, s*s*W] -> idefics3: mm.model.fc (no bias);
            // internvl: LayerNorm (eps 1e-5, torch's default) -> mm.0 -> GELU (erf) -> mm.2 -> [n * TPF, E]
            const float* feat = f32(x_);
            if (NF != T) {
                for (int64_t b = 0; b < n; ++b)
                    cuda_copy_d2d_async(f32(feat_) + b * NF * W, f32(x_) + (b * T + first_feat) * W, NF * W * kF32, s);
                feat = f32(feat_);
            }
            cuda_pixel_shuffle(feat, f32(shuffled_), n, c.grid, c.shuffle, W, s);
            if (c.projector == ProjectorKind::PixelShuffle) {
                cuda_vision_linear(mm_fc_, f32(shuffled_), n * TPF, f32(h2_), CudaDeviceBuffer(), s);
            } else {
                const int64_t KS = W * c.shuffle * c.shuffle;
                cuda_layer_norm(f32(shuffled_), f32(mm_ln_w_), f32(mm_ln_b_), f32(xn_), n * TPF, KS, 1e-5f, s);
                cuda_vision_linear(mm0_, f32(xn_), n * TPF, f32(h1_), mm0_b_, s);
                cuda_gelu(f32(h1_), f32(h1_), n * TPF * E, GeluMode::Erf, s);
                cuda_vision_linear(mm2_, f32(h1_), n * TPF, f32(h2_), mm2_b_, s);
            }
            h2_.download(out + f0 * TPF * E, n * TPF * E * kF32, 0, s);
            stream_->synchronize();
            continue;
        }
        const float* feat = f32(x_);  // [n * NF, W]
        if (NF != T) {
            for (int64_t b = 0; b < n; ++b)
                cuda_copy_d2d_async(f32(feat_) + b * NF * W, f32(x_) + (b * T + first_feat) * W, NF * W * kF32, s);
            feat = f32(feat_);
        }
        // projector: Linear -> GELU(erf) -> Linear
        cuda_vision_linear(mm0_, feat, n * NF, f32(h1_), mm0_b_, s);
        cuda_gelu(f32(h1_), f32(h1_), n * NF * E, GeluMode::Erf, s);
        cuda_vision_linear(mm2_, f32(h1_), n * NF, f32(h2_), mm2_b_, s);  // [n * NF, E]
        if (stage == Stage::Projected || c.pool == PoolMode::None) {
            h2_.download(out + f0 * NF * E, n * NF * E * kF32, 0, s);  // NF == TPF without pooling
        } else {
            cuda_pool2d(f32(h2_), f32(pooled_), n, c.feat_grid, c.pool_grid, E,
                        c.pool == PoolMode::Avg ? PoolKind::Avg : PoolKind::Bilinear, c.pool_stride, s);
            pooled_.download(out + f0 * TPF * E, n * TPF * E * kF32, 0, s);
        }
        stream_->synchronize();  // kernel faults surface here; the host buffers are reused next batch
    }
}

}  // namespace x2l
