#include "vision/qwen.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "core/common.h"
#include "cpu/vision_layout.h"
#include "llm/weights.h"
#include "vision/tower_attention.h"
#include "vision/tower_common.h"

namespace x2l {

namespace {

int positive_key(const GGUFFile& f, const std::string& key) { return x2l::positive_key(f, key, 1 << 20); }

}  // namespace

struct QwenVisionEncoder::Scratch {
    std::vector<float> rows;             // [N, 3 * temporal * p * p] pixel rows (qwen_patch_rows order)
    std::vector<float> x, xn, q, k, v;   // [N, width] (window-major unit order)
    std::vector<float> attn;             // [N, width]
    SegmentAttentionScratch seg;         // attention's transposed K, V and scores
    std::vector<float> gate, up;         // [N, n_ff]
    std::vector<float> cos, sin;         // [N, head_dim / 2]
    std::vector<float> h1, h2;           // [N / merge^2, merge^2 * width], [N / merge^2, n_embd]
    aligned_vector<uint8_t> act;
};

bool QwenVisionEncoder::handles(const GGUFFile& f) {
    const std::string p = f.get_str("clip.projector_type", "");
    return p == "qwen2vl_merger" || p == "qwen2.5vl_merger";
}

std::unique_ptr<QwenVisionEncoder> QwenVisionEncoder::load(const GGUFFile& f) {
    if (!f.get_bool("clip.has_vision_encoder", false)) throw FormatError("model has no vision encoder");
    if (!handles(f)) throw FormatError("clip.projector_type is not a Qwen merger (qwen2vl_merger, qwen2.5vl_merger)");
    std::unique_ptr<QwenVisionEncoder> m(new QwenVisionEncoder());
    QwenVisionConfig& c = m->cfg_;
    c.qwen25 = f.get_str("clip.projector_type") == "qwen2.5vl_merger";
    c.patch = positive_key(f, "clip.vision.patch_size");
    c.width = positive_key(f, "clip.vision.embedding_length");
    c.n_layer = positive_key(f, "clip.vision.block_count");
    c.n_head = positive_key(f, "clip.vision.attention.head_count");
    c.n_embd = positive_key(f, "clip.vision.projection_dim");
    if (f.has("clip.vision.spatial_merge_size")) c.merge = positive_key(f, "clip.vision.spatial_merge_size");
    if (f.has("x2l.vision.temporal_patch_size")) c.temporal = positive_key(f, "x2l.vision.temporal_patch_size");
    if (c.temporal != 2) throw FormatError("x2l.vision.temporal_patch_size must be 2 (two patch kernels)");
    if (c.width % c.n_head) throw FormatError("clip.vision.embedding_length is not a multiple of head_count");
    c.head_dim = c.width / c.n_head;
    if (c.head_dim % 4) throw FormatError("the Qwen ViT's head size must be a multiple of 4 (2-D rotary)");
    // The HF ViT hard-codes 1e-6 for its norms (llama.cpp's key may carry the LLM's epsilon).
    c.eps = 1e-6f;
    if (c.qwen25) {
        c.n_wa_pattern = positive_key(f, "clip.vision.n_wa_pattern");
        if (f.has("x2l.vision.window_size")) c.window_size = positive_key(f, "x2l.vision.window_size");
        if (c.window_size % (c.patch * c.merge)) {
            throw FormatError("x2l.vision.window_size must be a multiple of patch_size * merge");
        }
    }
    c.image_mean = image_norm_key(f, "clip.vision.image_mean", 0.5f);
    c.image_std = image_norm_key(f, "clip.vision.image_std", 0.5f);
    for (float s : c.image_std) {
        if (!(s > 0.0f)) throw FormatError("clip.vision.image_std must be positive");
    }

    const int64_t W = c.width, P = c.patch;
    size_t& total = m->weight_bytes_;
    // Conv3D [W, 3, 2, p, p] as two 2-D kernels; interleave them into the (channel, frame, y, x) columns
    // of the pixel rows.
    const std::vector<float> k0 = load_floats(f, "v.patch_embd.weight", {P, P, 3, W}, total);
    const std::vector<float> k1 = load_floats(f, "v.patch_embd.weight.1", {P, P, 3, W}, total);
    const int64_t PP = P * P, K = 3 * 2 * PP;
    m->patch_w_data_.resize(W * K);
    for (int64_t o = 0; o < W; ++o) {
        for (int ch = 0; ch < 3; ++ch) {
            std::memcpy(&m->patch_w_data_[o * K + (ch * 2 + 0) * PP], &k0[(o * 3 + ch) * PP], sizeof(float) * PP);
            std::memcpy(&m->patch_w_data_[o * K + (ch * 2 + 1) * PP], &k1[(o * 3 + ch) * PP], sizeof(float) * PP);
        }
    }
    m->patch_w_.type = DType::F32;
    m->patch_w_.n_in = K;
    m->patch_w_.n_out = W;
    m->patch_w_.data = reinterpret_cast<const uint8_t*>(m->patch_w_data_.data());
    m->patch_w_.row_bytes = sizeof(float) * K;

    const GGUFTensor& up0 = f.require_tensor("v.blk.0.ffn_up.weight", {W, -1});  // F: not the key (docs §1)
    c.n_ff = static_cast<int>(up0.ne[1]);
    if (c.n_ff <= 0) throw FormatError("v.blk.0.ffn_up.weight has no rows");
    const int64_t F = c.n_ff;
    m->layers_.resize(c.n_layer);
    for (int l = 0; l < c.n_layer; ++l) {
        const std::string p = "v.blk." + std::to_string(l) + ".";
        QwenVisionLayer& L = m->layers_[l];
        L.ln1_w = load_floats(f, p + "ln1.weight", {W}, total);
        L.ln2_w = load_floats(f, p + "ln2.weight", {W}, total);
        if (!c.qwen25) {
            L.ln1_b = load_floats(f, p + "ln1.bias", {W}, total);
            L.ln2_b = load_floats(f, p + "ln2.bias", {W}, total);
        }
        L.wq = load_weight(f, p + "attn_q.weight", W, W, total);
        L.wk = load_weight(f, p + "attn_k.weight", W, W, total);
        L.wv = load_weight(f, p + "attn_v.weight", W, W, total);
        L.wo = load_weight(f, p + "attn_out.weight", W, W, total);
        L.bq = load_floats(f, p + "attn_q.bias", {W}, total);
        L.bk = load_floats(f, p + "attn_k.bias", {W}, total);
        L.bv = load_floats(f, p + "attn_v.bias", {W}, total);
        L.bo = load_floats(f, p + "attn_out.bias", {W}, total);
        if (c.qwen25) {
            L.w_gate = load_weight(f, p + "ffn_gate.weight", W, F, total);
            L.b_gate = load_floats(f, p + "ffn_gate.bias", {F}, total);
        }
        L.w_up = load_weight(f, p + "ffn_up.weight", W, F, total);
        L.b_up = load_floats(f, p + "ffn_up.bias", {F}, total);
        L.w_down = load_weight(f, p + "ffn_down.weight", F, W, total);
        L.b_down = load_floats(f, p + "ffn_down.bias", {W}, total);
    }
    m->post_w_ = load_floats(f, "v.post_ln.weight", {W}, total);
    if (!c.qwen25) m->post_b_ = load_floats(f, "v.post_ln.bias", {W}, total);
    const int64_t MW = W * c.merge * c.merge;
    m->mm0_ = load_weight(f, "mm.0.weight", MW, MW, total);
    m->mm0_b_ = load_floats(f, "mm.0.bias", {MW}, total);
    m->mm2_ = load_weight(f, "mm.2.weight", MW, c.n_embd, total);
    m->mm2_b_ = load_floats(f, "mm.2.bias", {c.n_embd}, total);
    m->rope_ = vision_rope_axes(c.head_dim, 10000.0f);
    return m;
}

int64_t QwenVisionEncoder::n_tokens(int64_t n_frames, int height, int width) const {
    const int64_t side = static_cast<int64_t>(cfg_.patch) * cfg_.merge;
    const int64_t pairs = (n_frames + cfg_.temporal - 1) / cfg_.temporal;
    return pairs * (height / side) * (width / side);
}

void QwenVisionEncoder::encode(ThreadPool& pool, const float* frames, int64_t n_frames, int height, int width,
                               float* out, const Interrupt* interrupt) const {
    const QwenVisionConfig& c = cfg_;
    const int side = c.patch * c.merge;
    if (n_frames < 1) throw Error("no frames to encode");
    if (height < side || width < side || height % side || width % side) {
        throw Error("frame size " + std::to_string(height) + "x" + std::to_string(width) + " is not a positive multiple of " +
                    std::to_string(side) + " (patch * merge): resize first");
    }
    const int64_t plane = 3LL * height * width;
    const int64_t per_pair = (height / side) * static_cast<int64_t>(width / side);
    Scratch s;
    std::vector<float> pair(static_cast<size_t>(c.temporal) * plane);  // [temporal, 3, H, W]
    for (int64_t f0 = 0, t = 0; f0 < n_frames; f0 += c.temporal, ++t) {
        for (int j = 0; j < c.temporal; ++j) {  // an odd last frame (or an image) is repeated
            const int64_t src = std::min<int64_t>(f0 + j, n_frames - 1);
            std::memcpy(pair.data() + j * plane, frames + src * plane, sizeof(float) * plane);
        }
        run_pair(pool, s, pair.data(), height, width, out + t * per_pair * c.n_embd, interrupt);
    }
}

void QwenVisionEncoder::run_pair(ThreadPool& pool, Scratch& s, const float* pair, int height, int width,
                                 float* out, const Interrupt* interrupt) const {
    const QwenVisionConfig& c = cfg_;
    const int hp = height / c.patch, wp = width / c.patch, unit = c.merge * c.merge;
    const int64_t N = static_cast<int64_t>(hp) * wp, W = c.width, F = c.n_ff, K = patch_w_.n_in;
    const int64_t half = c.head_dim / 2, n_units = N / unit;

    // Merge units in window-major order (Qwen2.5; identity for Qwen2-VL): a window is then one
    // contiguous segment of rows. unit_order[k] = the raster merge unit at slot k.
    std::vector<int32_t> unit_order(n_units), window_len;
    if (c.qwen25) {
        WindowLayout wl = qwen_windows(hp, wp, c.merge, c.window_size / (c.patch * c.merge));
        unit_order = wl.unit_order;
        window_len = wl.window_tokens;
    } else {
        for (int64_t u = 0; u < n_units; ++u) unit_order[u] = static_cast<int32_t>(u);
    }
    const std::vector<int32_t> whole{static_cast<int32_t>(N)};

    s.rows.resize(N * K);
    qwen_patch_rows(pair, c.temporal, height, width, c.patch, c.merge, s.rows.data());
    std::vector<int32_t> row(N), col(N), pos(2 * N);  // pos [2, N] in slot order
    qwen_patch_coords(hp, wp, c.merge, row.data(), col.data());
    s.xn.resize(N * W);
    s.x.resize(N * W);
    matmul(pool, patch_w_, s.rows.data(), N, s.xn.data(), s.act);  // [N, W] raster-unit order
    for (int64_t k = 0; k < n_units; ++k) {
        const int64_t u = unit_order[k];
        std::memcpy(s.x.data() + k * unit * W, s.xn.data() + u * unit * W, sizeof(float) * unit * W);
        for (int i = 0; i < unit; ++i) {
            pos[k * unit + i] = row[u * unit + i];
            pos[N + k * unit + i] = col[u * unit + i];
        }
    }
    s.cos.resize(N * half);
    s.sin.resize(N * half);
    rope_axes_cos_sin(rope_, pos.data(), N, s.cos.data(), s.sin.data());

    s.q.resize(N * W);
    s.k.resize(N * W);
    s.v.resize(N * W);
    s.attn.resize(N * W);
    s.up.resize(N * F);
    if (c.qwen25) s.gate.resize(N * F);
    auto norm = [&](const std::vector<float>& w, const std::vector<float>& b, const float* x, float* y) {
        if (b.empty()) {
            rmsnorm(x, w.data(), y, W, c.eps);
        } else {
            layernorm(x, w.data(), b.data(), y, W, c.eps);
        }
    };
    for (int l = 0; l < c.n_layer; ++l) {
        check_interrupt(interrupt);
        const QwenVisionLayer& L = layers_[l];
        const bool full = !c.qwen25 || (l + 1) % c.n_wa_pattern == 0;
        per_row(pool, N, W, [&](int64_t r) { norm(L.ln1_w, L.ln1_b, s.x.data() + r * W, s.xn.data() + r * W); });
        MatmulJob qkv[3] = {{&L.wq, s.q.data(), L.bq.data()}, {&L.wk, s.k.data(), L.bk.data()},
                            {&L.wv, s.v.data(), L.bv.data()}};
        matmul(pool, s.xn.data(), N, W, qkv, 3, s.act);
        per_row(pool, N, W, [&](int64_t r) {
            rope_neox_apply(s.q.data() + r * W, 1, c.n_head, c.head_dim, s.cos.data() + r * half, s.sin.data() + r * half);
            rope_neox_apply(s.k.data() + r * W, 1, c.n_head, c.head_dim, s.cos.data() + r * half, s.sin.data() + r * half);
        });
        attention(pool, s, N, full ? whole : window_len);
        matmul(pool, L.wo, s.attn.data(), N, s.xn.data(), s.act, L.bo.data());
        per_row(pool, N, W, [&](int64_t r) {
            float* x = s.x.data() + r * W;
            add(x, s.xn.data() + r * W, W);
            norm(L.ln2_w, L.ln2_b, x, s.xn.data() + r * W);
        });
        if (c.qwen25) {  // SwiGLU: down(silu(gate(x)) * up(x))
            MatmulJob gu[2] = {{&L.w_gate, s.gate.data(), L.b_gate.data()}, {&L.w_up, s.up.data(), L.b_up.data()}};
            matmul(pool, s.xn.data(), N, W, gu, 2, s.act);
            per_row(pool, N, F, [&](int64_t r) { silu_mul(s.gate.data() + r * F, s.up.data() + r * F, F); });
            matmul(pool, L.w_down, s.gate.data(), N, s.xn.data(), s.act, L.b_down.data());
        } else {
            matmul(pool, L.w_up, s.xn.data(), N, s.up.data(), s.act, L.b_up.data());
            per_row(pool, N, F, [&](int64_t r) { quick_gelu(s.up.data() + r * F, F); });
            matmul(pool, L.w_down, s.up.data(), N, s.xn.data(), s.act, L.b_down.data());
        }
        per_row(pool, N, W, [&](int64_t r) { add(s.x.data() + r * W, s.xn.data() + r * W, W); });
    }

    // Merger: norm, the merge unit's rows side by side ([n_units, unit * W] is the row-major view of
    // [N, W]), mm.0 -> GELU (erf) -> mm.2; slot k's token goes to its raster unit.
    per_row(pool, N, W, [&](int64_t r) { norm(post_w_, post_b_, s.x.data() + r * W, s.xn.data() + r * W); });
    const int64_t MW = unit * W;
    s.h1.resize(n_units * MW);
    s.h2.resize(n_units * c.n_embd);
    matmul(pool, mm0_, s.xn.data(), n_units, s.h1.data(), s.act, mm0_b_.data());
    per_row(pool, n_units, MW, [&](int64_t r) { gelu_erf(s.h1.data() + r * MW, MW); });
    matmul(pool, mm2_, s.h1.data(), n_units, s.h2.data(), s.act, mm2_b_.data());
    for (int64_t k = 0; k < n_units; ++k) {
        std::memcpy(out + static_cast<int64_t>(unit_order[k]) * c.n_embd, s.h2.data() + k * c.n_embd,
                    sizeof(float) * c.n_embd);
    }
}

// Softmax attention inside contiguous segments of rows (seg_len sums to n), per head (vision/tower_attention.h).
void QwenVisionEncoder::attention(ThreadPool& pool, Scratch& s, int64_t n, const std::vector<int32_t>& seg_len) const {
    const QwenVisionConfig& c = cfg_;
    segment_attention(pool, s.q.data(), s.k.data(), s.v.data(), s.attn.data(), n, c.width, c.n_head, c.head_dim,
                      std::vector<int64_t>(seg_len.begin(), seg_len.end()), s.seg);
}

}  // namespace x2l
