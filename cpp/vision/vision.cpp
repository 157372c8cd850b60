#include "vision/vision.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "core/common.h"
#include "cpu/vision_layout.h"
#include "llm/weights.h"
#include "vision/tower_attention.h"
#include "vision/tower_common.h"

namespace x2l {

namespace {

int positive_key(const GGUFFile& f, const std::string& key) { return x2l::positive_key(f, key, 1 << 20); }

void activate(VisionAct a, float* x, int64_t n) {
    switch (a) {
        case VisionAct::GeluTanh: gelu_tanh(x, n); break;
        case VisionAct::QuickGelu: quick_gelu(x, n); break;
        case VisionAct::GeluErf: gelu_erf(x, n); break;
    }
}


}  // namespace

std::vector<float> image_norm_key(const GGUFFile& f, const std::string& key, float dflt) {
    std::vector<float> out(3, dflt);
    if (f.has(key)) {
        std::vector<double> v = f.get_float_array(key);
        if (v.size() != 3) throw FormatError("metadata key '" + key + "' must hold 3 values");
        for (int i = 0; i < 3; ++i) {
            if (!std::isfinite(v[i]) || std::fabs(v[i]) > 1e6) throw FormatError("metadata key '" + key + "' holds a non-finite or huge value");
            out[i] = static_cast<float>(v[i]);
        }
    }
    return out;
}

// Activations of one batch of frames. Sized for the batch at the start of encode() and reused
// across batches; nothing here outlives the call.
struct VisionEncoder::Scratch {
    std::vector<float> patches;  // [n * n_patches, 3*p*p] im2col rows
    std::vector<float> x;        // [n * n_tokens, width] residual stream
    std::vector<float> xn;       // [n * n_tokens, width] normed input / sub-layer output
    std::vector<float> q, k, v;  // [n * n_tokens, width]
    std::vector<float> attn;     // [n * n_tokens, width]
    std::vector<float> ff;       // [n * n_tokens, n_ff]
    SegmentAttentionScratch seg;  // attention's transposed K, V and scores
    std::vector<float> feat;     // [n * n_feat, width] features without CLS (when dropped)
    std::vector<float> h1, h2;   // [n * n_feat, n_embd] projector hidden / output
    std::vector<float> shuffled; // [n * tokens_per_frame, shuffle^2 * width] (pixel shuffle)
    aligned_vector<uint8_t> act;  // matmul activation scratch
};

std::unique_ptr<VisionEncoder> VisionEncoder::load(const GGUFFile& f) {
    if (!f.get_bool("clip.has_vision_encoder", false)) throw FormatError("model has no vision encoder");
    std::unique_ptr<VisionEncoder> m(new VisionEncoder());
    VisionConfig& c = m->cfg_;

    const std::string proj = f.get_str("clip.projector_type", "mlp");
    const bool idefics3 = proj == "idefics3";
    const bool internvl = proj == "internvl";
    // llama.cpp's LLaVA-1.5 mmproj (its legacy convert_image_encoder_to_gguf.py): projector mlp described by
    // clip.* keys only, the CLIP (or SigLIP) tower cut after the feature layer, fc1 / fc2 stored as
    // ffn_down / ffn_up.
    const bool llava = proj == "mlp" && !f.has("x2l.vision.kind") && f.get_bool("clip.has_llava_projector", false);
    if (idefics3) {
        c.kind = VisionKind::Siglip;
    } else if (internvl) {
        c.kind = VisionKind::InternViT;
    } else if (llava) {
        c.kind = f.find_tensor("v.class_embd") ? VisionKind::Clip : VisionKind::Siglip;
    } else {
        const std::string kind = f.get_str("x2l.vision.kind");
        if (kind == "siglip") {
            c.kind = VisionKind::Siglip;
        } else if (kind == "clip") {
            c.kind = VisionKind::Clip;
        } else {
            throw FormatError("unsupported x2l.vision.kind '" + kind + "' (supported: siglip, clip)");
        }
    }
    const bool siglip = c.kind == VisionKind::Siglip;

    c.image_size = positive_key(f, "clip.vision.image_size");
    c.patch_size = positive_key(f, "clip.vision.patch_size");
    c.width = positive_key(f, "clip.vision.embedding_length");
    c.n_ff = positive_key(f, "clip.vision.feed_forward_length");
    c.n_layer_stored = positive_key(f, "clip.vision.block_count");
    c.n_head = positive_key(f, "clip.vision.attention.head_count");
    c.eps = bounded_float_key(f, "clip.vision.attention.layer_norm_epsilon", siglip || internvl ? 1e-6 : 1e-5, 0.0, 1.0);
    // A stride-p conv drops the last image_size % p pixels (SigLIP-384/14 gives 27 x 27 patches).
    if (c.patch_size > c.image_size) throw FormatError("clip.vision.patch_size is larger than image_size");
    if (c.width % c.n_head != 0) throw FormatError("clip.vision.embedding_length is not a multiple of head_count");
    c.head_dim = c.width / c.n_head;
    c.grid = c.image_size / c.patch_size;
    c.n_patches = c.grid * c.grid;
    c.has_cls = !siglip;
    c.n_tokens = c.n_patches + (c.has_cls ? 1 : 0);
    c.drop_cls = c.has_cls && (internvl || f.get_bool("x2l.vision.drop_cls", true));
    c.pre_norm = c.kind == VisionKind::Clip;

    if (idefics3) {
        configure_idefics3(f, c);
    } else if (internvl) {
        configure_internvl(f, c);
    } else {
        const std::string act = llava ? llava_act(f) : f.get_str("x2l.vision.act", siglip ? "gelu_tanh" : "quick_gelu");
        if (act == "gelu_tanh" || act == "gelu_pytorch_tanh") {
            c.act = VisionAct::GeluTanh;
        } else if (act == "quick_gelu") {
            c.act = VisionAct::QuickGelu;
        } else if (act == "gelu") {
            c.act = VisionAct::GeluErf;
        } else {
            throw FormatError("unsupported x2l.vision.act '" + act + "' (supported: gelu_tanh, quick_gelu, gelu)");
        }

        // HF hidden_states[i]: 0 = embeddings (after the pre-LN), i = output of layer i-1.
        const int64_t sel = llava ? llava_select(f, c) : f.get_int("x2l.vision.select_layer");
        const int64_t idx = sel >= 0 ? sel : c.n_layer_stored + 1 + sel;
        if (idx < 0 || idx > c.n_layer_stored) {
            throw FormatError("x2l.vision.select_layer " + std::to_string(sel) + " is out of range for " +
                              std::to_string(c.n_layer_stored) + " stored layers");
        }
        c.select_layer = static_cast<int>(sel);
        c.n_layer_run = static_cast<int>(idx);

        if (proj != "mlp") {
            throw FormatError("unsupported clip.projector_type '" + proj + "' (supported: mlp, idefics3, internvl)");
        }

        c.n_feat = c.drop_cls || !c.has_cls ? c.n_patches : c.n_tokens;
        c.feat_grid = c.n_feat == c.n_patches ? c.grid : 0;
        const std::string pool = llava ? "none" : f.get_str("x2l.pool.mode");  // LLaVA-1.5: every patch a token
        if (pool == "none") {
            c.pool = PoolMode::None;
        } else if (pool == "bilinear") {
            c.pool = PoolMode::Bilinear;
        } else if (pool == "avg") {
            c.pool = PoolMode::Avg;
        } else {
            throw FormatError("unsupported x2l.pool.mode '" + pool + "' (supported: bilinear, avg, none)");
        }
        c.pool_stride = static_cast<int>(f.get_int("x2l.pool.stride", 2));
        if (c.pool_stride < 1 || c.pool_stride > 64) throw FormatError("invalid x2l.pool.stride " + std::to_string(c.pool_stride));
        if (!f.get_bool("x2l.pool.after_projector", true)) {
            throw FormatError("x2l.pool.after_projector = false is not supported");
        }
        if (c.pool != PoolMode::None && c.feat_grid == 0) {
            throw FormatError("pooling needs a square patch grid: set x2l.vision.drop_cls for a CLS model");
        }
        if (c.pool == PoolMode::None) {
            c.pool_grid = c.feat_grid;
            c.tokens_per_frame = c.n_feat;
        } else {
            // F.interpolate to ceil(g/s) for bilinear; avg_pool2d(kernel=stride=s) floors.
            c.pool_grid = c.pool == PoolMode::Bilinear ? (c.grid + c.pool_stride - 1) / c.pool_stride : c.grid / c.pool_stride;
            if (c.pool_grid < 1) throw FormatError("x2l.pool.stride is larger than the patch grid");
            c.tokens_per_frame = c.pool_grid * c.pool_grid;
        }
        if (f.has("x2l.tokens_per_frame") && f.get_int("x2l.tokens_per_frame") != c.tokens_per_frame) {
            throw FormatError("x2l.tokens_per_frame is " + std::to_string(f.get_int("x2l.tokens_per_frame")) +
                              " but the vision settings give " + std::to_string(c.tokens_per_frame));
        }
        c.resize = f.get_str("x2l.image.resize", siglip ? "square" : "shortest_center_crop");
        c.resample = f.get_str("x2l.image.resample", "bicubic");
        c.newline = f.get_str("x2l.video.newline", "none");
    }

    c.image_mean = image_norm_key(f, "clip.vision.image_mean", 0.5f);
    c.image_std = image_norm_key(f, "clip.vision.image_std", 0.5f);
    for (float s : c.image_std) {
        if (!(s > 0.0f)) throw FormatError("clip.vision.image_std must be positive");
    }

    // ---- tensors
    size_t& total = m->weight_bytes_;
    const int64_t W = c.width, P = c.patch_size, FF = c.n_ff;
    const int64_t K = 3 * P * P;
    {
        // The conv kernel [width, 3, p, p] (ggml ne [p, p, 3, width]) is row-major per output channel,
        // i.e. exactly a [width, 3*p*p] matrix; a converter may also store it flattened.
        const char* name = "v.patch_embd.weight";
        const GGUFTensor* t = f.find_tensor(name);
        if (t && t->n_dims == 2) {
            m->patch_w_ = load_weight(f, name, K, W, total);
        } else {
            f.require_tensor(name, {P, P, 3, W});
            const TypeInfo& ti = type_info(t->type);
            if (!ti.compute || K % ti.block_size != 0) {
                throw FormatError(std::string("tensor 'v.patch_embd.weight' has unsupported type ") + ti.name);
            }
            Weight w;
            w.type = t->type;
            w.n_in = K;
            w.n_out = W;
            w.data = t->data;
            w.row_bytes = row_bytes(t->type, K);
            total += t->nbytes;
            m->patch_w_ = w;
        }
    }
    if (siglip) {
        m->patch_b_ = load_floats(f, "v.patch_embd.bias", {W}, total);
    } else if (internvl) {
        m->patch_b_ = load_floats(f, "v.patch_embd.bias", {W}, total);
        m->class_embd_ = load_floats(f, "v.class_embd", {W}, total);
    } else {
        m->class_embd_ = load_floats(f, "v.class_embd", {W}, total);
        m->pre_ln_w_ = load_floats(f, "v.pre_ln.weight", {W}, total);
        m->pre_ln_b_ = load_floats(f, "v.pre_ln.bias", {W}, total);
    }
    m->pos_embd_ = load_floats(f, "v.position_embd.weight", {W, c.n_tokens}, total);

    m->layers_.resize(c.n_layer_run);
    if (internvl) {
        // Which optional tensors the tower has is read from block 0; every block must agree.
        c.rms_norm = f.find_tensor("v.blk.0.ln1.bias") == nullptr;
        c.layer_scale = f.find_tensor("v.blk.0.ls1.weight") != nullptr;
        c.qk_norm = f.find_tensor("v.blk.0.attn_q_norm.weight") != nullptr;
    }
    for (int l = 0; l < c.n_layer_run && internvl; ++l) m->load_internvit_layer(f, l, total);
    // fc1 [W -> FF] and fc2 [FF -> W]; the legacy LLaVA converter names them the other way round.
    const std::string fc1 = llava ? "ffn_down" : "ffn_up", fc2 = llava ? "ffn_up" : "ffn_down";
    for (int l = 0; l < c.n_layer_run && !internvl; ++l) {
        const std::string p = "v.blk." + std::to_string(l) + ".";
        VisionLayer& L = m->layers_[l];
        L.ln1_w = load_floats(f, p + "ln1.weight", {W}, total);
        L.ln1_b = load_floats(f, p + "ln1.bias", {W}, total);
        L.ln2_w = load_floats(f, p + "ln2.weight", {W}, total);
        L.ln2_b = load_floats(f, p + "ln2.bias", {W}, total);
        L.wq = load_weight(f, p + "attn_q.weight", W, W, total);
        L.wk = load_weight(f, p + "attn_k.weight", W, W, total);
        L.wv = load_weight(f, p + "attn_v.weight", W, W, total);
        L.wo = load_weight(f, p + "attn_out.weight", W, W, total);
        L.bq = load_floats(f, p + "attn_q.bias", {W}, total);
        L.bk = load_floats(f, p + "attn_k.bias", {W}, total);
        L.bv = load_floats(f, p + "attn_v.bias", {W}, total);
        L.bo = load_floats(f, p + "attn_out.bias", {W}, total);
        L.w_up = load_weight(f, p + fc1 + ".weight", W, FF, total);
        L.b_up = load_floats(f, p + fc1 + ".bias", {FF}, total);
        L.w_down = load_weight(f, p + fc2 + ".weight", FF, W, total);
        L.b_down = load_floats(f, p + fc2 + ".bias", {W}, total);
    }

    if (internvl) {
        // mm.model.mlp.{0,1,3}: LayerNorm [s*s*W], Linear [s*s*W -> E], (GELU), Linear [E -> E]
        const int64_t KS = W * c.shuffle * c.shuffle;
        m->mm_ln_w_ = load_floats(f, "mm.model.mlp.0.weight", {KS}, total);
        m->mm_ln_b_ = load_floats(f, "mm.model.mlp.0.bias", {KS}, total);
        const GGUFTensor& mm1 = f.require_tensor("mm.model.mlp.1.weight", {KS, -1});
        c.n_embd = static_cast<int>(mm1.ne[1]);
        if (c.n_embd <= 0) throw FormatError("mm.model.mlp.1.weight has no rows");
        m->mm0_ = load_weight(f, "mm.model.mlp.1.weight", KS, c.n_embd, total);
        m->mm0_b_ = load_floats(f, "mm.model.mlp.1.bias", {c.n_embd}, total);
        m->mm2_ = load_weight(f, "mm.model.mlp.3.weight", c.n_embd, c.n_embd, total);
        m->mm2_b_ = load_floats(f, "mm.model.mlp.3.bias", {c.n_embd}, total);
        if (f.has("clip.vision.projection_dim") && f.get_int("clip.vision.projection_dim") != c.n_embd) {
            throw FormatError("clip.vision.projection_dim is " + std::to_string(f.get_int("clip.vision.projection_dim")) +
                              " but mm.model.mlp.1.weight has " + std::to_string(c.n_embd) + " rows");
        }
    } else if (idefics3) {
        m->post_ln_w_ = load_floats(f, "v.post_ln.weight", {W}, total);
        m->post_ln_b_ = load_floats(f, "v.post_ln.bias", {W}, total);
        const int64_t KS = W * c.shuffle * c.shuffle;
        const GGUFTensor& fc = f.require_tensor("mm.model.fc.weight", {KS, -1});
        c.n_embd = static_cast<int>(fc.ne[1]);
        if (c.n_embd <= 0) throw FormatError("mm.model.fc.weight has no rows");
        m->mm_fc_ = load_weight(f, "mm.model.fc.weight", KS, c.n_embd, total);
        if (f.has("clip.vision.projection_dim") && f.get_int("clip.vision.projection_dim") != c.n_embd) {
            throw FormatError("clip.vision.projection_dim is " + std::to_string(f.get_int("clip.vision.projection_dim")) +
                              " but mm.model.fc.weight has " + std::to_string(c.n_embd) + " rows");
        }
    } else {
        const GGUFTensor& mm0 = f.require_tensor("mm.0.weight", {W, -1});
        c.n_embd = static_cast<int>(mm0.ne[1]);
        if (c.n_embd <= 0) throw FormatError("mm.0.weight has no rows");
        m->mm0_ = load_weight(f, "mm.0.weight", W, c.n_embd, total);
        m->mm0_b_ = load_floats(f, "mm.0.bias", {c.n_embd}, total);
        m->mm2_ = load_weight(f, "mm.2.weight", c.n_embd, c.n_embd, total);
        m->mm2_b_ = load_floats(f, "mm.2.bias", {c.n_embd}, total);
        if (f.find_tensor("mm.image_newline")) {
            m->newline_ = load_floats(f, "mm.image_newline", {c.n_embd}, total);
        } else if (c.newline != "none") {
            throw FormatError("missing required tensor 'mm.image_newline' (x2l.video.newline is '" + c.newline + "')");
        }
    }
    if (c.pool == PoolMode::Bilinear) {
        // torch upsample_bilinear2d, align_corners=False, output size given (no scale factor):
        // src = (dst + 0.5) * in/out - 0.5, clamped at 0; the right tap is clamped at the edge.
        const int in = c.feat_grid, out = c.pool_grid;
        const float scale = static_cast<float>(in) / static_cast<float>(out);
        for (int o = 0; o < out; ++o) {
            float src = std::max(scale * (static_cast<float>(o) + 0.5f) - 0.5f, 0.0f);
            int i0 = static_cast<int>(src);
            int i1 = i0 + (i0 < in - 1 ? 1 : 0);
            float l1 = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
            m->bl_i0_.push_back(i0);
            m->bl_i1_.push_back(i1);
            m->bl_l0_.push_back(1.0f - l1);
            m->bl_l1_.push_back(l1);
        }
    }
    m->batch_frames_ = std::max(1, kBatchTokens / c.n_tokens);
    return m;
}

// The MLP activation of a legacy LLaVA mmproj: clip.use_gelu (HF "gelu", erf), else CLIP's quick_gelu.
std::string VisionEncoder::llava_act(const GGUFFile& f) {
    if (f.get_bool("clip.use_silu", false)) throw FormatError("a LLaVA mmproj with clip.use_silu is not supported");
    return f.get_bool("clip.use_gelu", false) ? "gelu" : "quick_gelu";
}

// The feature layer of a legacy LLaVA mmproj, as a select_layer over its stored blocks: the converter keeps
// exactly the blocks up to the feature layer (clip.vision.feature_layer, a hidden_states index, when the
// config named one; else all but the last, LLaVA-1.5's -2), so the feature is the last stored block's output.
int64_t VisionEncoder::llava_select(const GGUFFile& f, const VisionConfig& c) {
    if (f.has("clip.vision.image_grid_pinpoints")) {
        throw FormatError("a LLaVA-1.6 mmproj (clip.vision.image_grid_pinpoints: anyres tiles) is not supported; "
                          "LLaVA-1.5 mmproj files are");
    }
    if (f.has("clip.vision.feature_layer")) {
        const std::vector<int64_t> layers = f.get_int_array("clip.vision.feature_layer");
        if (layers.size() != 1) throw FormatError("clip.vision.feature_layer: several feature layers are not supported");
        if (layers[0] != c.n_layer_stored) {
            throw FormatError("clip.vision.feature_layer " + std::to_string(layers[0]) + " is not the last of the " +
                              std::to_string(c.n_layer_stored) + " stored blocks");
        }
    }
    return -1;
}

// llama.cpp's idefics3 mmproj (docs/families.md §5): the SigLIP tower of SmolVLM2 / Idefics3 with every
// block run and its post-LN applied, then the pixel shuffle by clip.vision.projector.scale_factor.
void VisionEncoder::configure_idefics3(const GGUFFile& f, VisionConfig& c) {
    if (f.get_bool("clip.use_silu", false) || !f.get_bool("clip.use_gelu", false)) {
        throw FormatError("an idefics3 mmproj needs clip.use_gelu = true (SigLIP's gelu_tanh MLP)");
    }
    c.act = VisionAct::GeluTanh;
    c.select_layer = -1;
    c.n_layer_run = c.n_layer_stored;
    c.post_norm = true;
    c.projector = ProjectorKind::PixelShuffle;
    configure_shuffle(f, c, "idefics3");
    c.resize = "square";  // SmolVLM2's video frames: stretched to image_size x image_size (x2l_edge/smolvlm.py)
    c.resample = "lanczos";
}

// llama.cpp's internvl mmproj (docs/families.md §6): InternViT with every block run, no final norm, the
// CLS row dropped, then the pixel shuffle by clip.vision.projector.scale_factor and the MLP projector.
void VisionEncoder::configure_internvl(const GGUFFile& f, VisionConfig& c) {
    if (f.get_bool("clip.use_silu", false) || !f.get_bool("clip.use_gelu", false)) {
        throw FormatError("an internvl mmproj needs clip.use_gelu = true (InternViT's GELU MLP; clip.use_silu is "
                          "not supported)");
    }
    c.act = VisionAct::GeluErf;  // HF's "gelu" is the exact erf form
    c.select_layer = -1;
    c.n_layer_run = c.n_layer_stored;
    c.projector = ProjectorKind::ShuffleMlp;
    configure_shuffle(f, c, "internvl");
    c.resize = "square";  // InternVL's video frames: one tile, stretched to image_size x image_size (x2l_edge/internvl.py)
    c.resample = "bicubic";
}

void VisionEncoder::configure_shuffle(const GGUFFile& f, VisionConfig& c, const char* family) {
    if (!f.has("clip.vision.projector.scale_factor")) {
        throw FormatError(std::string("an ") + family +
                          " mmproj needs clip.vision.projector.scale_factor (the pixel-shuffle scale)");
    }
    c.shuffle = positive_key(f, "clip.vision.projector.scale_factor");
    if (c.grid % c.shuffle != 0) {
        throw FormatError("clip.vision.projector.scale_factor " + std::to_string(c.shuffle) + " does not divide the " +
                          std::to_string(c.grid) + "x" + std::to_string(c.grid) + " patch grid");
    }
    c.n_feat = c.n_patches;
    c.feat_grid = c.grid;
    c.pool = PoolMode::None;
    c.pool_grid = c.grid / c.shuffle;
    c.tokens_per_frame = c.pool_grid * c.pool_grid;
    c.newline = "none";
}

void VisionEncoder::load_internvit_layer(const GGUFFile& f, int l, size_t& total) {
    const int64_t W = cfg_.width, FF = cfg_.n_ff;
    const std::string p = "v.blk." + std::to_string(l) + ".";
    // A tensor that block 0 decides on: required when block 0 has it, refused when it has not.
    auto same_as_block0 = [&](const std::string& suffix, int64_t n) -> std::vector<float> {
        const bool want = f.find_tensor("v.blk.0." + suffix) != nullptr;
        const bool has = f.find_tensor(p + suffix) != nullptr;
        if (has && !want) {
            throw FormatError("tensor '" + p + suffix + "' is present but 'v.blk.0." + suffix +
                              "' is not (every block has it or none)");
        }
        if (want && !has) throw FormatError("missing required tensor '" + p + suffix + "' (block 0 has it)");
        return want ? load_floats(f, p + suffix, {n}, total) : std::vector<float>{};
    };
    VisionLayer& L = layers_[l];
    L.ln1_w = load_floats(f, p + "ln1.weight", {W}, total);
    L.ln2_w = load_floats(f, p + "ln2.weight", {W}, total);
    L.ln1_b = same_as_block0("ln1.bias", W);
    L.ln2_b = same_as_block0("ln2.bias", W);
    if (L.ln1_b.empty() != L.ln2_b.empty()) {
        throw FormatError("'" + p + "ln1.bias' and '" + p + "ln2.bias' must both be present (LayerNorm) or both "
                          "absent (RMSNorm)");
    }
    L.wq = load_weight(f, p + "attn_q.weight", W, W, total);
    L.wk = load_weight(f, p + "attn_k.weight", W, W, total);
    L.wv = load_weight(f, p + "attn_v.weight", W, W, total);
    L.wo = load_weight(f, p + "attn_out.weight", W, W, total);
    L.bq = same_as_block0("attn_q.bias", W);  // InternViT-6B has no q/k/v biases
    L.bk = same_as_block0("attn_k.bias", W);
    L.bv = same_as_block0("attn_v.bias", W);
    L.bo = same_as_block0("attn_out.bias", W);
    L.q_norm = same_as_block0("attn_q_norm.weight", W);
    L.k_norm = same_as_block0("attn_k_norm.weight", W);
    if (L.q_norm.empty() != L.k_norm.empty()) {
        throw FormatError("'" + p + "attn_q_norm.weight' and '" + p + "attn_k_norm.weight' come together");
    }
    L.ls1 = same_as_block0("ls1.weight", W);
    L.ls2 = same_as_block0("ls2.weight", W);
    if (L.ls1.empty() != L.ls2.empty()) {
        throw FormatError("'" + p + "ls1.weight' and '" + p + "ls2.weight' come together");
    }
    L.w_up = load_weight(f, p + "ffn_up.weight", W, FF, total);
    L.b_up = load_floats(f, p + "ffn_up.bias", {FF}, total);
    L.w_down = load_weight(f, p + "ffn_down.weight", FF, W, total);
    L.b_down = load_floats(f, p + "ffn_down.bias", {W}, total);
}

void VisionEncoder::set_batch_frames(int n) {
    if (n < 1) throw Error("batch_frames must be >= 1");
    batch_frames_ = n;
}

int64_t VisionEncoder::rows_per_frame(Stage s) const {
    if (s == Stage::Features) return cfg_.n_feat;
    return s == Stage::Pooled || shuffles() ? cfg_.tokens_per_frame : cfg_.n_feat;
}

int64_t VisionEncoder::cols(Stage s) const { return s == Stage::Features ? cfg_.width : cfg_.n_embd; }

void VisionEncoder::im2col_row(const float* pixels, int64_t r, float* dst) const {
    const int64_t P = cfg_.patch_size, G = cfg_.grid, S = cfg_.image_size, NP = cfg_.n_patches;
    const int64_t b = r / NP, pi = r % NP, py = pi / G, px = pi % G;
    for (int ch = 0; ch < 3; ++ch) {
        const float* plane = pixels + (b * 3 + ch) * S * S;
        for (int64_t ky = 0; ky < P; ++ky) {
            std::memcpy(dst, plane + (py * P + ky) * S + px * P, sizeof(float) * P);
            dst += P;
        }
    }
}

void VisionEncoder::run_tower(ThreadPool& pool, Scratch& s, const float* pixels, int64_t n,
                              const Interrupt* interrupt) const {
    const VisionConfig& c = cfg_;
    const int64_t W = c.width, T = c.n_tokens, NP = c.n_patches, P = c.patch_size, FF = c.n_ff;
    const int64_t K = 3 * P * P;
    const int64_t rows = n * T;

    // ---- patch embedding: im2col [n * NP, 3*p*p] (channel, ky, kx order = conv weight order), then matmul.
    per_row(pool, n * NP, K, [&](int64_t r) { im2col_row(pixels, r, s.patches.data() + r * K); });
    // SigLIP: patches are the tokens, so write straight into x. CLIP: token 0 is the CLS.
    float* emb = c.has_cls ? s.xn.data() : s.x.data();  // [n * NP, W]
    matmul(pool, patch_w_, s.patches.data(), n * NP, emb, s.act, patch_b_.empty() ? nullptr : patch_b_.data());
    per_row(pool, rows, W, [&](int64_t r) {
        const int64_t b = r / T, t = r % T;
        float* y = s.x.data() + r * W;
        const float* pos = pos_embd_.data() + t * W;
        if (c.has_cls) {
            const float* src = t == 0 ? class_embd_.data() : emb + (b * NP + t - 1) * W;
            for (int64_t i = 0; i < W; ++i) y[i] = src[i] + pos[i];
            if (c.pre_norm) layernorm(y, pre_ln_w_.data(), pre_ln_b_.data(), y, W, c.eps);
        } else {
            add(y, pos, W);
        }
    });

    // ---- encoder layers (pre-LN transformer)
    // A bias or scale the tower does not have is an empty vector: null.
    auto ptr = [](const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); };
    auto norm = [&](const float* x, const std::vector<float>& w, const std::vector<float>& b, float* y) {
        if (c.rms_norm) {
            rmsnorm(x, w.data(), y, W, c.eps);
        } else {
            layernorm(x, w.data(), b.data(), y, W, c.eps);
        }
    };
    // x += scale * y (scale [W], or 1 without layer scales)
    auto residual = [&](float* x, const float* y, const std::vector<float>& scale) {
        if (scale.empty()) {
            add(x, y, W);
        } else {
            for (int64_t i = 0; i < W; ++i) x[i] += scale[i] * y[i];
        }
    };
    for (const VisionLayer& L : layers_) {
        check_interrupt(interrupt);
        per_row(pool, rows, W, [&](int64_t r) { norm(s.x.data() + r * W, L.ln1_w, L.ln1_b, s.xn.data() + r * W); });
        MatmulJob qkv[3] = {{&L.wq, s.q.data(), ptr(L.bq)}, {&L.wk, s.k.data(), ptr(L.bk)}, {&L.wv, s.v.data(), ptr(L.bv)}};
        matmul(pool, s.xn.data(), rows, W, qkv, 3, s.act);
        if (!L.q_norm.empty()) {  // over the whole width, before the heads split
            per_row(pool, rows, W, [&](int64_t r) {
                rmsnorm(s.q.data() + r * W, L.q_norm.data(), s.q.data() + r * W, W, c.eps);
                rmsnorm(s.k.data() + r * W, L.k_norm.data(), s.k.data() + r * W, W, c.eps);
            });
        }
        attention(pool, s, n);
        matmul(pool, L.wo, s.attn.data(), rows, s.xn.data(), s.act, ptr(L.bo));
        per_row(pool, rows, W, [&](int64_t r) {
            float* x = s.x.data() + r * W;
            residual(x, s.xn.data() + r * W, L.ls1);
            norm(x, L.ln2_w, L.ln2_b, s.xn.data() + r * W);
        });
        matmul(pool, L.w_up, s.xn.data(), rows, s.ff.data(), s.act, L.b_up.data());
        per_row(pool, rows, FF, [&](int64_t r) { activate(c.act, s.ff.data() + r * FF, FF); });
        matmul(pool, L.w_down, s.ff.data(), rows, s.xn.data(), s.act, L.b_down.data());
        per_row(pool, rows, W, [&](int64_t r) { residual(s.x.data() + r * W, s.xn.data() + r * W, L.ls2); });
    }
    if (c.post_norm) {
        per_row(pool, rows, W, [&](int64_t r) {
            float* x = s.x.data() + r * W;
            layernorm(x, post_ln_w_.data(), post_ln_b_.data(), x, W, c.eps);
        });
    }
}

// Full (unmasked) self-attention inside each frame, per head (vision/tower_attention.h).
void VisionEncoder::attention(ThreadPool& pool, Scratch& s, int64_t n) const {
    const VisionConfig& c = cfg_;
    segment_attention(pool, s.q.data(), s.k.data(), s.v.data(), s.attn.data(), n * c.n_tokens, c.width, c.n_head,
                      c.head_dim, std::vector<int64_t>(static_cast<size_t>(n), c.n_tokens), s.seg);
}

void VisionEncoder::pool_frame(const float* in, float* out, int64_t stride, int64_t C) const {
    const VisionConfig& c = cfg_;
    const int g = c.feat_grid, pg = c.pool_grid;
    if (c.pool == PoolMode::Avg) {
        // avg_pool2d(kernel = stride = s, no padding): the mean of each s x s block.
        const int st = c.pool_stride;
        const float div = static_cast<float>(st * st);
        for (int oy = 0; oy < pg; ++oy) {
            for (int ox = 0; ox < pg; ++ox) {
                float* o = out + (static_cast<int64_t>(oy) * pg + ox) * stride;
                std::fill(o, o + C, 0.0f);
                for (int ky = 0; ky < st; ++ky) {
                    for (int kx = 0; kx < st; ++kx) {
                        add(o, in + (static_cast<int64_t>(oy * st + ky) * g + ox * st + kx) * stride, C);
                    }
                }
                for (int64_t i = 0; i < C; ++i) o[i] /= div;
            }
        }
    } else {  // Bilinear, same tap order as torch: h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d)
        for (int oy = 0; oy < pg; ++oy) {
            const float* r0 = in + static_cast<int64_t>(bl_i0_[oy]) * g * stride;
            const float* r1 = in + static_cast<int64_t>(bl_i1_[oy]) * g * stride;
            const float h0 = bl_l0_[oy], h1 = bl_l1_[oy];
            for (int ox = 0; ox < pg; ++ox) {
                const int64_t c0 = static_cast<int64_t>(bl_i0_[ox]) * stride, c1 = static_cast<int64_t>(bl_i1_[ox]) * stride;
                const float w0 = bl_l0_[ox], w1 = bl_l1_[ox];
                float* o = out + (static_cast<int64_t>(oy) * pg + ox) * stride;
                for (int64_t i = 0; i < C; ++i) {
                    o[i] = h0 * (w0 * r0[c0 + i] + w1 * r0[c1 + i]) + h1 * (w0 * r1[c0 + i] + w1 * r1[c1 + i]);
                }
            }
        }
    }
}

void VisionEncoder::encode(ThreadPool& pool, const float* pixels, int64_t n_frames, float* out, Stage stage,
                           const Interrupt* interrupt) const {
    const VisionConfig& c = cfg_;
    if (n_frames < 0) throw Error("n_frames must be >= 0");
    if (n_frames == 0) return;
    const int64_t W = c.width, T = c.n_tokens, E = c.n_embd, NF = c.n_feat, S = c.image_size;
    const int64_t B = std::min<int64_t>(batch_frames_, n_frames);
    const int64_t frame_px = 3 * S * S;

    Scratch s;
    s.patches.resize(static_cast<size_t>(B * c.n_patches * 3 * c.patch_size * c.patch_size));
    s.x.resize(B * T * W);
    s.xn.resize(B * T * W);
    s.q.resize(B * T * W);
    s.k.resize(B * T * W);
    s.v.resize(B * T * W);
    s.attn.resize(B * T * W);
    s.ff.resize(B * T * c.n_ff);
    const bool shuffle = shuffles();
    if (stage != Stage::Features && shuffle) {
        s.shuffled.resize(B * NF * W);  // the same values, regrouped
        if (c.projector == ProjectorKind::ShuffleMlp) s.h1.resize(B * c.tokens_per_frame * E);
    } else if (stage != Stage::Features) {
        if (NF != T) s.feat.resize(B * NF * W);
        s.h1.resize(B * NF * E);
        if (stage == Stage::Pooled) s.h2.resize(B * NF * E);
    }
    const int64_t first_feat = NF == T ? 0 : 1;  // CLS is token 0 when it is dropped

    for (int64_t f0 = 0; f0 < n_frames; f0 += B) {
        const int64_t n = std::min(B, n_frames - f0);
        check_interrupt(interrupt);
        run_tower(pool, s, pixels + f0 * frame_px, n, interrupt);
        check_interrupt(interrupt);
        if (stage == Stage::Features) {
            float* dst = out + f0 * NF * W;
            for (int64_t b = 0; b < n; ++b) {
                std::memcpy(dst + b * NF * W, s.x.data() + (b * T + first_feat) * W, sizeof(float) * NF * W);
            }
            continue;
        }
        if (shuffle) {
            // [n * NF, W] (CLS skipped) -> [n * TPF, s*s*W]
            const int64_t TPF = c.tokens_per_frame, KS = W * c.shuffle * c.shuffle;
            for (int64_t b = 0; b < n; ++b) {
                pixel_shuffle(s.x.data() + (b * T + first_feat) * W, c.grid, W, c.shuffle,
                              s.shuffled.data() + b * TPF * KS);
            }
            float* dst = out + f0 * TPF * E;  // [n * TPF, E]
            if (c.projector == ProjectorKind::PixelShuffle) {  // mm.model.fc
                matmul(pool, mm_fc_, s.shuffled.data(), n * TPF, dst, s.act, nullptr);
                continue;
            }
            // InternVL: LayerNorm (eps 1e-5, torch's default) -> Linear -> GELU (erf) -> Linear
            per_row(pool, n * TPF, KS, [&](int64_t r) {
                float* y = s.shuffled.data() + r * KS;
                layernorm(y, mm_ln_w_.data(), mm_ln_b_.data(), y, KS, 1e-5f);
            });
            matmul(pool, mm0_, s.shuffled.data(), n * TPF, s.h1.data(), s.act, mm0_b_.data());
            per_row(pool, n * TPF, E, [&](int64_t r) { gelu_erf(s.h1.data() + r * E, E); });
            matmul(pool, mm2_, s.h1.data(), n * TPF, dst, s.act, mm2_b_.data());
            continue;
        }
        const float* feat = s.x.data();  // [n * NF, W]
        if (NF != T) {
            for (int64_t b = 0; b < n; ++b) {
                std::memcpy(s.feat.data() + b * NF * W, s.x.data() + (b * T + first_feat) * W, sizeof(float) * NF * W);
            }
            feat = s.feat.data();
        }
        // projector: Linear -> GELU(erf) -> Linear
        matmul(pool, mm0_, feat, n * NF, s.h1.data(), s.act, mm0_b_.data());
        per_row(pool, n * NF, E, [&](int64_t r) { gelu_erf(s.h1.data() + r * E, E); });
        float* proj = stage == Stage::Projected ? out + f0 * NF * E : s.h2.data();  // [n * NF, E]
        matmul(pool, mm2_, s.h1.data(), n * NF, proj, s.act, mm2_b_.data());
        if (stage == Stage::Projected) continue;

        const int64_t TPF = c.tokens_per_frame;
        if (c.pool == PoolMode::None) {
            std::memcpy(out + f0 * TPF * E, proj, sizeof(float) * n * NF * E);
            continue;
        }
        // Pool each frame; split channels across threads so one frame still uses the whole pool.
        const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(pool.n_threads() * 4, E / 64));
        const int64_t chunk = (E + n_chunks - 1) / n_chunks;
        auto pool_chunks = [&](int64_t jb, int64_t je) {
            for (int64_t j = jb; j < je; ++j) {
                const int64_t b = j / n_chunks, c0 = (j % n_chunks) * chunk, cw = std::min(chunk, E - c0);
                if (cw > 0) pool_frame(proj + b * NF * E + c0, out + (f0 + b) * TPF * E + c0, E, cw);
            }
        };
        if (n * NF * E < kMinParallelWork) {
            pool_chunks(0, n * n_chunks);
        } else {
            pool.parallel_for(n * n_chunks, pool_chunks);
        }
    }
}

}  // namespace x2l
