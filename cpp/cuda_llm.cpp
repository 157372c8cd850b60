#include "cuda_llm.h"

#include <algorithm>
#include <cstring>

#include "common.h"

namespace x2l {

namespace {
constexpr size_t kF16 = 2;
// Flash-decoding splits for the few-query calls (decode): the workspace caps how many rows may split.
constexpr int kMaxSplitRows = 8, kMaxSplits = 64;
}  // namespace

CudaLlm::DevWeight CudaLlm::upload(const Weight& w, const std::string& name) {
    if (!cuda_matmul_supported(w.type)) {
        throw Error("the CUDA backend cannot read " + name + " (type " + type_info(w.type).name +
                    "); use f32, f16, q8_0, q4_0, q4_1, q5_0, q4_k or q6_k weights, or device='cpu'");
    }
    if (cuda_row_bytes(w.type, w.n_in) != w.row_bytes) throw Error("unexpected row layout of " + name);
    DevWeight d;
    d.type = w.type;
    d.n_in = w.n_in;
    d.n_out = w.n_out;
    d.buf = CudaDeviceBuffer(w.nbytes());
    d.buf.upload(w.data, w.nbytes());
    weight_bytes_ += w.nbytes();
    return d;
}

static CudaDeviceBuffer upload_floats(const std::vector<float>& v, size_t& total) {
    CudaDeviceBuffer b;
    if (v.empty()) return b;
    b = CudaDeviceBuffer(v.size() * sizeof(float));
    b.upload(v.data(), v.size() * sizeof(float));
    total += v.size() * sizeof(float);
    return b;
}

CudaLlm::CudaLlm(const LlmModel& model, int device, int64_t n_ctx, int64_t n_batch)
    : cfg_(model.config()), device_(device), n_ctx_(n_ctx), n_batch_(n_batch) {
    if (device < 0 || device >= cuda_device_count()) {
        throw Error("CUDA device " + std::to_string(device) + " is not available (" +
                    std::to_string(cuda_device_count()) + " usable devices)");
    }
    if (n_ctx <= 0 || n_batch <= 0) throw Error("n_ctx and n_batch must be > 0");
    const LlmConfig& c = cfg_;
    if (c.head_dim % 4 != 0 || c.head_dim > 256) throw Error("the CUDA attention kernel needs head_dim % 4 == 0 and <= 256");
    cuda_set_device(device);
    name_ = cuda_device_info(device).name;
    stream_.reset(new CudaStream(true));

    const int64_t E = c.n_embd, QD = static_cast<int64_t>(c.n_head) * c.head_dim,
                  KD = static_cast<int64_t>(c.n_head_kv) * c.head_dim, FF = c.n_ff, V = c.n_vocab;
    const auto& src = model.layers();
    layers_.resize(src.size());
    for (size_t l = 0; l < src.size(); ++l) {
        const LlmLayer& L = src[l];
        DevLayer& d = layers_[l];
        const std::string p = "blk." + std::to_string(l) + ".";
        if (L.vst_q.valid()) throw Error("beacon (Video-XL) models run on the CPU backend only; use device='cpu'");
        d.attn_norm = upload_floats(L.attn_norm, weight_bytes_);
        d.ffn_norm = upload_floats(L.ffn_norm, weight_bytes_);
        d.bq = upload_floats(L.bq, weight_bytes_);
        d.bk = upload_floats(L.bk, weight_bytes_);
        d.bv = upload_floats(L.bv, weight_bytes_);
        d.wq = upload(L.wq, p + "attn_q");
        d.wk = upload(L.wk, p + "attn_k");
        d.wv = upload(L.wv, p + "attn_v");
        d.wo = upload(L.wo, p + "attn_output");
        d.w_gate = upload(L.w_gate, p + "ffn_gate");
        d.w_up = upload(L.w_up, p + "ffn_up");
        d.w_down = upload(L.w_down, p + "ffn_down");
        d.k = CudaDeviceBuffer(static_cast<size_t>(n_ctx) * KD * kF16);
        d.v = CudaDeviceBuffer(static_cast<size_t>(n_ctx) * KD * kF16);
    }
    output_ = upload(model.output_weight(), "output");
    output_norm_ = upload_floats(model.output_norm(), weight_bytes_);

    const size_t f = sizeof(float);
    x_ = CudaDeviceBuffer(n_batch * E * f);
    xn_ = CudaDeviceBuffer(n_batch * std::max(E, QD) * f);
    q_ = CudaDeviceBuffer(n_batch * QD * f);
    k_ = CudaDeviceBuffer(n_batch * KD * f);
    v_ = CudaDeviceBuffer(n_batch * KD * f);
    attn_ = CudaDeviceBuffer(n_batch * QD * f);
    gate_ = CudaDeviceBuffer(n_batch * FF * f);
    up_ = CudaDeviceBuffer(n_batch * FF * f);
    pos_ = CudaDeviceBuffer(n_batch * sizeof(int32_t));
    logits_ = CudaDeviceBuffer(n_batch * V * f);
    attn_ws_ = CudaDeviceBuffer(cuda_attention_workspace_bytes(kMaxSplitRows, c.n_head, c.head_dim, kMaxSplits));
    tables_.resize(layers_.size());
}

CudaLlm::~CudaLlm() = default;

size_t CudaLlm::kv_bytes() const {
    return static_cast<size_t>(n_past_) * cfg_.n_head_kv * cfg_.head_dim * kF16 * 2 * cfg_.n_layer;
}

size_t CudaLlm::device_bytes() const {
    size_t b = weight_bytes_;
    for (const auto& L : layers_) b += L.k.size() + L.v.size();
    for (const CudaDeviceBuffer* p : {&x_, &xn_, &q_, &k_, &v_, &attn_, &gate_, &up_, &pos_, &logits_, &attn_ws_}) b += p->size();
    return b;
}

void CudaLlm::truncate(int64_t n) {
    if (n < 0 || n > n_past_) throw Error("truncate: n out of range");
    n_past_ = n;  // later tokens overwrite the rows beyond n
}

void CudaLlm::matmul(const DevWeight& w, const float* x, int64_t n, float* y, const CudaDeviceBuffer& bias) {
    void* s = stream_->handle();
    cuda_matmul(w.type, w.buf.data(), w.n_out, w.n_in, x, n, y, s);
    if (bias.size()) cuda_add(y, static_cast<const float*>(bias.data()), y, n * w.n_out, w.n_out, s);
}

void CudaLlm::forward(const float* x, int64_t n, int64_t n_logits, float* logits) {
    if (n <= 0) return;
    if (n_logits < 0 || n_logits > n) throw Error("invalid n_logits");
    if (n_past_ + n > n_ctx_) throw BudgetError("context is full");
    cuda_set_device(device_);
    const int64_t before = n_past_, first_logit = n - n_logits;
    try {
        for (int64_t b = 0; b < n; b += n_batch_) {
            const int64_t m = std::min(n_batch_, n - b);
            // Rows of this batch among the last n_logits of the call: always the batch's last ones.
            const int64_t from = std::max(b, first_logit), k = std::max<int64_t>(0, b + m - from);
            forward_batch(x + b * cfg_.n_embd, m, k, k ? logits + (from - first_logit) * cfg_.n_vocab : nullptr);
        }
    } catch (...) {
        n_past_ = before;
        throw;
    }
}

void CudaLlm::forward_batch(const float* x_host, int64_t m, int64_t n_logits, float* logits) {
    const LlmConfig& c = cfg_;
    const int64_t E = c.n_embd, QD = static_cast<int64_t>(c.n_head) * c.head_dim,
                  KD = static_cast<int64_t>(c.n_head_kv) * c.head_dim, FF = c.n_ff;
    void* s = stream_->handle();
    const int64_t first = n_past_;
    float* x = static_cast<float*>(x_.data());
    float* xn = static_cast<float*>(xn_.data());
    float* q = static_cast<float*>(q_.data());
    float* k = static_cast<float*>(k_.data());
    float* v = static_cast<float*>(v_.data());
    float* attn = static_cast<float*>(attn_.data());
    float* gate = static_cast<float*>(gate_.data());
    float* up = static_cast<float*>(up_.data());
    const int32_t* pos = static_cast<const int32_t*>(pos_.data());
    std::vector<int32_t> pos_host(m);
    for (int64_t i = 0; i < m; ++i) pos_host[i] = static_cast<int32_t>(first + i);
    // Pageable sources: the runtime stages them before returning, so the host vectors may go.
    x_.upload(x_host, m * E * sizeof(float), 0, s);
    pos_.upload(pos_host.data(), m * sizeof(int32_t), 0, s);
    const RopeMode mode = c.rope_type == RopeType::Neox ? RopeMode::Neox : RopeMode::Norm;
    const CudaDeviceBuffer none;

    for (int l = 0; l < c.n_layer; ++l) {
        DevLayer& L = layers_[l];
        cuda_rms_norm(x, static_cast<const float*>(L.attn_norm.data()), xn, m, E, c.rms_eps, s);
        matmul(L.wq, xn, m, q, L.bq);  // [m, QD]
        matmul(L.wk, xn, m, k, L.bk);  // [m, KD]
        matmul(L.wv, xn, m, v, L.bv);  // [m, KD]
        cuda_rope(q, q, pos, m, c.n_head, c.head_dim, QD, c.rope_dim, c.rope_base, 1.0f, mode, s);
        cuda_rope(k, k, pos, m, c.n_head_kv, c.head_dim, KD, c.rope_dim, c.rope_base, 1.0f, mode, s);
        // Append to the f16 cache [n_ctx, n_head_kv, head_dim]: the batch's rows are contiguous.
        uint8_t* kc = static_cast<uint8_t*>(L.k.data());
        uint8_t* vc = static_cast<uint8_t*>(L.v.data());
        cuda_f32_to_f16(k, kc + first * KD * kF16, m * KD, s);
        cuda_f32_to_f16(v, vc + first * KD * kF16, m * KD, s);

        CudaKVSegment seg;
        seg.k = kc;
        seg.v = vc;
        seg.k_tok_stride = seg.v_tok_stride = KD * static_cast<int64_t>(kF16);
        seg.k_head_stride = seg.v_head_stride = c.head_dim * static_cast<int64_t>(kF16);
        seg.n_tokens = first + m;
        seg.k_type = seg.v_type = static_cast<uint32_t>(DType::F16);
        tables_[l].assign({seg}, c.head_dim, s);
        CudaAttentionParams p;
        p.q = q;
        p.out = attn;
        p.n_q = static_cast<int>(m);
        p.n_head = c.n_head;
        p.n_kv_head = c.n_head_kv;
        p.head_dim = c.head_dim;
        p.causal = true;
        p.workspace = attn_ws_.data();
        p.workspace_bytes = attn_ws_.size();
        cuda_attention(p, tables_[l], s);  // [m, QD]

        matmul(L.wo, attn, m, xn, none);
        cuda_add(x, xn, x, m * E, m * E, s);
        cuda_rms_norm(x, static_cast<const float*>(L.ffn_norm.data()), xn, m, E, c.rms_eps, s);
        matmul(L.w_gate, xn, m, gate, none);  // [m, FF]
        matmul(L.w_up, xn, m, up, none);      // [m, FF]
        cuda_swiglu(gate, up, gate, m * FF, s);
        matmul(L.w_down, gate, m, xn, none);  // [m, E]
        cuda_add(x, xn, x, m * E, m * E, s);
    }
    if (n_logits > 0) {
        cuda_rms_norm(x + (m - n_logits) * E, static_cast<const float*>(output_norm_.data()), xn, n_logits, E,
                      c.rms_eps, s);
        matmul(output_, xn, n_logits, static_cast<float*>(logits_.data()), none);
        logits_.download(logits, n_logits * c.n_vocab * sizeof(float), 0, s);
    }
    stream_->synchronize();  // kernel faults surface here, before the batch counts as appended
    n_past_ = first + m;
}

}  // namespace x2l
