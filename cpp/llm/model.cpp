#include "llm/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/common.h"
#include "core/hash.h"
#include "cpu/attention.h"
#include "llm/weights.h"

namespace x2l {

size_t Workspace::bytes() const {
    size_t f = x.capacity() + xn.capacity() + q.capacity() + k.capacity() + v.capacity() + attn.capacity() +
               gate.capacity() + up.capacity() + rope_cos.capacity() + rope_sin.capacity();
    return f * sizeof(float) + attention.bytes() + act.capacity();
}

namespace {

std::vector<float> load_vector(const GGUFFile& f, const std::string& name, int64_t n, size_t& total) {
    return load_floats(f, name, {n}, total);
}

int positive_key(const GGUFFile& f, const std::string& key) { return x2l::positive_key(f, key, 1 << 24); }

uint64_t weights_fingerprint(const GGUFFile& f, const LlmConfig& c) {
    constexpr size_t kWindow = 1024, kWindows = 16;
    Xxh64 h;
    h.update(c.arch.data(), c.arch.size());
    for (int v : {c.n_vocab, c.n_embd, c.n_layer, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.rope_dim}) h.update_pod(v);
    h.update_pod(c.rms_eps);
    h.update_pod(c.rope_base);
    for (const GGUFTensor& t : f.tensors()) {
        h.update(t.name.data(), t.name.size() + 1);  // with its terminator: names cannot run together
        h.update_pod(static_cast<uint32_t>(t.type));
        h.update(t.ne, sizeof(t.ne));
        if (t.nbytes <= kWindow * kWindows) {
            h.update(t.data, t.nbytes);
            continue;
        }
        for (size_t w = 0; w < kWindows; ++w) {  // the first window at 0, the last ending at nbytes
            h.update(t.data + (t.nbytes - kWindow) / (kWindows - 1) * w, kWindow);
        }
    }
    return h.digest();
}

}  // namespace

std::unique_ptr<LlmModel> LlmModel::load(const GGUFFile& f) {
    std::unique_ptr<LlmModel> m(new LlmModel());
    LlmConfig& c = m->cfg_;
    c.arch = f.get_str("general.architecture");
    if (c.arch != "llama" && c.arch != "qwen2" && c.arch != "qwen2vl") {
        throw FormatError("unsupported architecture '" + c.arch + "' (supported: llama, qwen2, qwen2vl)");
    }
    const std::string a = c.arch + ".";
    c.n_embd = positive_key(f, a + "embedding_length");
    c.n_layer = positive_key(f, a + "block_count");
    c.n_head = positive_key(f, a + "attention.head_count");
    c.n_head_kv = f.has(a + "attention.head_count_kv") ? positive_key(f, a + "attention.head_count_kv") : c.n_head;
    c.n_ff = positive_key(f, a + "feed_forward_length");
    c.n_ctx_train = f.has(a + "context_length") ? positive_key(f, a + "context_length") : 4096;
    c.head_dim = f.has(a + "attention.key_length") ? positive_key(f, a + "attention.key_length") : c.n_embd / c.n_head;
    if (f.has(a + "attention.value_length") && f.get_int(a + "attention.value_length") != c.head_dim) {
        throw FormatError("attention.value_length != key_length is not supported");
    }
    c.rope_dim = f.has(a + "rope.dimension_count") ? positive_key(f, a + "rope.dimension_count") : c.head_dim;
    c.rms_eps = bounded_float_key(f, a + "attention.layer_norm_rms_epsilon", 1e-5, 0.0, 1.0);
    c.rope_base = bounded_float_key(f, a + "rope.freq_base", 10000.0, 0.0, 1e12);
    c.rope_type = c.arch == "llama" ? RopeType::Norm : RopeType::Neox;
    if (c.arch == "qwen2vl") {  // M-RoPE: pairs split over the t, h, w axes by rope.dimension_sections
        const std::string key = a + "rope.dimension_sections";
        if (!f.has(key)) throw FormatError("qwen2vl model lacks '" + key + "' (the M-RoPE sections)");
        const std::vector<int64_t> sec = f.get_int_array(key);
        if (sec.size() < 3) throw FormatError("'" + key + "' must have at least 3 entries");
        c.n_pos_axes = 3;
        for (int i = 0; i < 3; ++i) {
            if (sec[i] < 0 || sec[i] > 1024) throw FormatError("'" + key + "' holds an invalid section");
            c.rope_sections[i] = static_cast<int>(sec[i]);
        }
        for (size_t i = 3; i < sec.size(); ++i) {
            if (sec[i] != 0) throw FormatError("'" + key + "': a fourth M-RoPE section is not supported");
        }
    }
    if (c.n_head % c.n_head_kv != 0) throw FormatError("head_count must be a multiple of head_count_kv");
    if (c.rope_dim > c.head_dim || c.rope_dim % 2 != 0 || c.head_dim > 256) {
        throw FormatError("unsupported rope.dimension_count / head size");
    }
    std::string scaling = f.get_str(a + "rope.scaling.type", "none");
    if (scaling != "none" && !(scaling == "linear" && f.get_float(a + "rope.scaling.factor", 1.0) == 1.0)) {
        throw FormatError("rope scaling '" + scaling + "' is not supported");
    }

    const GGUFTensor& te = f.require_tensor("token_embd.weight", {c.n_embd, -1});
    c.n_vocab = static_cast<int>(te.ne[1]);
    if (c.n_vocab <= 0) throw FormatError("token_embd.weight has no rows");

    size_t& total = m->weight_bytes_;
    m->tok_embd_ = load_weight(f, "token_embd.weight", c.n_embd, c.n_vocab, total);
    m->output_norm_ = load_vector(f, "output_norm.weight", c.n_embd, total);
    if (f.find_tensor("output.weight")) {
        m->output_ = load_weight(f, "output.weight", c.n_embd, c.n_vocab, total);
    } else {
        c.tied_output = true;
        m->output_ = m->tok_embd_;
    }

    const int64_t q_dim = static_cast<int64_t>(c.n_head) * c.head_dim;
    const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * c.head_dim;
    m->layers_.resize(c.n_layer);
    for (int l = 0; l < c.n_layer; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        LlmLayer& L = m->layers_[l];
        L.attn_norm = load_vector(f, p + "attn_norm.weight", c.n_embd, total);
        L.ffn_norm = load_vector(f, p + "ffn_norm.weight", c.n_embd, total);
        L.wq = load_weight(f, p + "attn_q.weight", c.n_embd, q_dim, total);
        L.wk = load_weight(f, p + "attn_k.weight", c.n_embd, kv_dim, total);
        L.wv = load_weight(f, p + "attn_v.weight", c.n_embd, kv_dim, total);
        L.wo = load_weight(f, p + "attn_output.weight", q_dim, c.n_embd, total);
        L.w_gate = load_weight(f, p + "ffn_gate.weight", c.n_embd, c.n_ff, total);
        L.w_up = load_weight(f, p + "ffn_up.weight", c.n_embd, c.n_ff, total);
        L.w_down = load_weight(f, p + "ffn_down.weight", c.n_ff, c.n_embd, total);
        if (f.find_tensor(p + "attn_q.bias")) {
            L.bq = load_vector(f, p + "attn_q.bias", q_dim, total);
            L.bk = load_vector(f, p + "attn_k.bias", kv_dim, total);
            L.bv = load_vector(f, p + "attn_v.bias", kv_dim, total);
        } else if (c.arch != "llama") {
            throw FormatError("missing required tensor '" + p + "attn_q.bias' (" + c.arch + " has q/k/v biases)");
        }
    }
    // Beacon (Video-XL) weights: all three projections in every layer, or none.
    if (const GGUFTensor* ve = f.find_tensor("vst_embd.weight")) {
        if (ve->type != DType::F32 && ve->type != DType::F16) throw FormatError("vst_embd.weight must be f32 or f16");
        f.require_tensor("vst_embd.weight", {c.n_embd, 1});
        m->vst_embd_.resize(c.n_embd);
        dequantize_row(ve->type, ve->data, m->vst_embd_.data(), c.n_embd);
        total += ve->nbytes;
        for (int l = 0; l < c.n_layer; ++l) {
            const std::string p = "blk." + std::to_string(l) + ".";
            LlmLayer& L = m->layers_[l];
            L.vst_q = load_weight(f, p + "vst_q.weight", c.n_embd, q_dim, total);
            L.vst_k = load_weight(f, p + "vst_k.weight", c.n_embd, kv_dim, total);
            L.vst_v = load_weight(f, p + "vst_v.weight", c.n_embd, kv_dim, total);
            if (f.find_tensor(p + "vst_q.bias")) {
                L.vst_bq = load_vector(f, p + "vst_q.bias", q_dim, total);
                L.vst_bk = load_vector(f, p + "vst_k.bias", kv_dim, total);
                L.vst_bv = load_vector(f, p + "vst_v.bias", kv_dim, total);
            }
        }
    }

    m->fingerprint_ = weights_fingerprint(f, c);
    m->inv_freq_.resize(c.rope_dim / 2);
    for (int i = 0; i < c.rope_dim / 2; ++i) {
        m->inv_freq_[i] = static_cast<float>(1.0 / std::pow(static_cast<double>(c.rope_base), 2.0 * i / c.rope_dim));
    }
    if (c.n_pos_axes == 3) {
        if (c.rope_dim != c.head_dim) throw FormatError("M-RoPE needs rope.dimension_count == the head size");
        try {
            m->mrope_ = mrope_axes(c.head_dim, c.rope_base, c.rope_sections);
        } catch (const std::invalid_argument& e) {
            throw FormatError(std::string("qwen2vl.rope.dimension_sections: ") + e.what());
        }
    }
    return m;
}

void LlmModel::embed(const int32_t* tokens, int64_t n, float* out) const {
    for (int64_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= cfg_.n_vocab) {
            throw Error("token id " + std::to_string(tokens[i]) + " is out of range [0, " + std::to_string(cfg_.n_vocab) + ")");
        }
        dequantize_row(tok_embd_.type, tok_embd_.row(tokens[i]), out + i * cfg_.n_embd, cfg_.n_embd);
    }
}

void LlmModel::forward(ThreadPool& pool, Workspace& ws, float* x, int64_t n, const int32_t* pos, KVCache& cache,
                       int64_t n_logits, float* logits, const ForwardHooks* hooks, const PrefillHooks* prefill,
                       const Interrupt* interrupt) const {
    const LlmConfig& c = cfg_;
    if (n <= 0) return;
    if (n_logits < 0 || n_logits > n) throw Error("invalid n_logits");
    const int64_t E = c.n_embd, QD = static_cast<int64_t>(c.n_head) * c.head_dim,
                  KD = static_cast<int64_t>(c.n_head_kv) * c.head_dim, FF = c.n_ff;
    ws.xn.resize(n * std::max(E, QD));
    ws.q.resize(n * QD);
    ws.k.resize(n * KD);
    ws.v.resize(n * KD);
    ws.attn.resize(n * QD);
    ws.gate.resize(n * FF);
    ws.up.resize(n * FF);

    KVSegment& tail = cache.tail();
    const int64_t first = tail.append(pos, n);
    const bool mrope = c.n_pos_axes > 1;
    const int64_t half = c.head_dim / 2;
    if (mrope) {  // the angles of every token, once for all layers
        ws.rope_cos.resize(n * half);
        ws.rope_sin.resize(n * half);
        rope_axes_cos_sin(mrope_, pos, n, ws.rope_cos.data(), ws.rope_sin.data());
    }
    // Token-parallel helper: elementwise work is tiny for one token, so skip the pool then.
    auto per_token = [&](const std::function<void(int64_t)>& fn) {
        if (n == 1) {
            fn(0);
        } else {
            pool.parallel_for(n, [&](int64_t b, int64_t e) {
                for (int64_t t = b; t < e; ++t) fn(t);
            });
        }
    };

    try {
        for (int l = 0; l < c.n_layer; ++l) {
            check_interrupt(interrupt);
            const LlmLayer& L = layers_[l];
            per_token([&](int64_t t) { rmsnorm(x + t * E, L.attn_norm.data(), ws.xn.data() + t * E, E, c.rms_eps); });
            MatmulJob qkv[3] = {{&L.wq, ws.q.data(), L.bq.empty() ? nullptr : L.bq.data()},
                                {&L.wk, ws.k.data(), L.bk.empty() ? nullptr : L.bk.data()},
                                {&L.wv, ws.v.data(), L.bv.empty() ? nullptr : L.bv.data()}};
            matmul(pool, ws.xn.data(), n, E, qkv, 3, ws.act);
            if (prefill && prefill->vst_rows) beacon_qkv(pool, ws, L, n, prefill->vst_rows);
            if (hooks && hooks->on_qk) hooks->on_qk(l, ws.q.data(), ws.k.data(), n);
            per_token([&](int64_t t) {
                if (mrope) {
                    const float* cs = ws.rope_cos.data() + t * half;
                    const float* sn = ws.rope_sin.data() + t * half;
                    rope_neox_apply(ws.q.data() + t * QD, 1, c.n_head, c.head_dim, cs, sn);
                    rope_neox_apply(ws.k.data() + t * KD, 1, c.n_head_kv, c.head_dim, cs, sn);
                } else {
                    rope(ws.q.data() + t * QD, c.n_head, c.head_dim, c.rope_dim, pos[t], inv_freq_.data(), c.rope_type);
                    rope(ws.k.data() + t * KD, c.n_head_kv, c.head_dim, c.rope_dim, pos[t], inv_freq_.data(), c.rope_type);
                }
                tail.store(l, first + t, ws.k.data() + t * KD, ws.v.data() + t * KD);
            });
            if (hooks && hooks->before_attention) hooks->before_attention(l);
            AttentionObserver votes;  // this layer's slice of the prefill's votes
            if (prefill && prefill->votes.out) {
                votes = prefill->votes;
                votes.out += static_cast<size_t>(l) * c.n_head_kv * (votes.end - votes.begin);
            }
            attention(pool, ws.attention, {c.n_head, c.n_head_kv, c.head_dim}, l, ws.q.data(), ws.attn.data(), n, first,
                      cache, &votes);
            matmul(pool, L.wo, ws.attn.data(), n, ws.xn.data(), ws.act);
            per_token([&](int64_t t) {
                add(x + t * E, ws.xn.data() + t * E, E);
                rmsnorm(x + t * E, L.ffn_norm.data(), ws.xn.data() + t * E, E, c.rms_eps);
            });
            MatmulJob ffn[2] = {{&L.w_gate, ws.gate.data(), nullptr}, {&L.w_up, ws.up.data(), nullptr}};
            matmul(pool, ws.xn.data(), n, E, ffn, 2, ws.act);
            per_token([&](int64_t t) { silu_mul(ws.gate.data() + t * FF, ws.up.data() + t * FF, FF); });
            matmul(pool, L.w_down, ws.gate.data(), n, ws.xn.data(), ws.act);
            per_token([&](int64_t t) { add(x + t * E, ws.xn.data() + t * E, E); });
        }
        if (n_logits > 0) this->logits(pool, ws, x + (n - n_logits) * E, n_logits, logits);
    } catch (...) {
        tail.truncate(first);  // leave the cache as it was before the call
        throw;
    }
}

void LlmModel::beacon_qkv(ThreadPool& pool, Workspace& ws, const LlmLayer& L, int64_t n, const uint8_t* vst) const {
    if (!L.vst_q.valid()) throw Error("this model has no beacon (VST) weights");
    const int64_t E = cfg_.n_embd, QD = L.vst_q.n_out, KD = L.vst_k.n_out;
    std::vector<int64_t> rows;
    for (int64_t t = 0; t < n; ++t) {
        if (vst[t]) rows.push_back(t);
    }
    if (rows.empty()) return;
    const int64_t m = static_cast<int64_t>(rows.size());
    ws.vx.resize(m * E);
    ws.vq.resize(m * QD);
    ws.vk.resize(m * KD);
    ws.vv.resize(m * KD);
    for (int64_t i = 0; i < m; ++i) std::memcpy(ws.vx.data() + i * E, ws.xn.data() + rows[i] * E, sizeof(float) * E);
    MatmulJob jobs[3] = {{&L.vst_q, ws.vq.data(), L.vst_bq.empty() ? nullptr : L.vst_bq.data()},
                         {&L.vst_k, ws.vk.data(), L.vst_bk.empty() ? nullptr : L.vst_bk.data()},
                         {&L.vst_v, ws.vv.data(), L.vst_bv.empty() ? nullptr : L.vst_bv.data()}};
    matmul(pool, ws.vx.data(), m, E, jobs, 3, ws.act);
    for (int64_t i = 0; i < m; ++i) {
        std::memcpy(ws.q.data() + rows[i] * QD, ws.vq.data() + i * QD, sizeof(float) * QD);
        std::memcpy(ws.k.data() + rows[i] * KD, ws.vk.data() + i * KD, sizeof(float) * KD);
        std::memcpy(ws.v.data() + rows[i] * KD, ws.vv.data() + i * KD, sizeof(float) * KD);
    }
}

void LlmModel::logits(ThreadPool& pool, Workspace& ws, const float* x, int64_t n, float* out) const {
    const int64_t E = cfg_.n_embd;
    if (ws.xn.size() < static_cast<size_t>(n * E)) ws.xn.resize(n * E);
    for (int64_t t = 0; t < n; ++t) rmsnorm(x + t * E, output_norm_.data(), ws.xn.data() + t * E, E, cfg_.rms_eps);
    matmul(pool, output_, ws.xn.data(), n, out, ws.act);
}

}  // namespace x2l
