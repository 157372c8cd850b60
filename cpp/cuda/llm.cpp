#include "cuda/llm.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/common.h"

namespace x2l {

namespace {
constexpr size_t kF16 = 2;
// Flash-decoding splits for the few-query calls (decode): the workspace caps how many rows may split.
constexpr int kMaxSplitRows = 8, kMaxSplits = 64;
}  // namespace

CudaMatrix cuda_upload_weight(const Weight& w, const std::string& name, size_t& total) {
    if (!cuda_matmul_supported(w.type)) {
        throw Error("the CUDA backend cannot read " + name + " (type " + type_info(w.type).name +
                    "); use f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k or q6_k weights, or device='cpu'");
    }
    if (cuda_row_bytes(w.type, w.n_in) != w.row_bytes) throw Error("unexpected row layout of " + name);
    CudaMatrix d;
    d.type = w.type;
    d.n_in = w.n_in;
    d.n_out = w.n_out;
    d.buf = CudaDeviceBuffer(w.nbytes());
    d.buf.upload(w.data, w.nbytes());
    total += w.nbytes();
    return d;
}

CudaDeviceBuffer cuda_upload_floats(const std::vector<float>& v, size_t& total) {
    CudaDeviceBuffer b;
    if (v.empty()) return b;
    b = CudaDeviceBuffer(v.size() * sizeof(float));
    b.upload(v.data(), v.size() * sizeof(float));
    total += v.size() * sizeof(float);
    return b;
}

CudaLlm::CudaLlm(const LlmModel& model, int device) : cfg_(model.config()), device_(device) {
    if (device < 0 || device >= cuda_device_count()) {
        throw Error("CUDA device " + std::to_string(device) + " is not available (" +
                    std::to_string(cuda_device_count()) + " usable devices)");
    }
    const LlmConfig& c = cfg_;
    if (c.head_dim % 4 != 0 || c.head_dim > 256) throw Error("the CUDA attention kernel needs head_dim % 4 == 0 and <= 256");
    cuda_set_device(device);
    const CudaDeviceInfo info = cuda_device_info(device);
    name_ = info.name;
    integrated_ = info.integrated && info.can_map_host_memory;
    const auto& src = model.layers();
    layers_.resize(src.size());
    for (size_t l = 0; l < src.size(); ++l) {
        const LlmLayer& L = src[l];
        Layer& d = layers_[l];
        const std::string p = "blk." + std::to_string(l) + ".";
        d.attn_norm = cuda_upload_floats(L.attn_norm, weight_bytes_);
        d.ffn_norm = cuda_upload_floats(L.ffn_norm, weight_bytes_);
        d.bq = cuda_upload_floats(L.bq, weight_bytes_);
        d.bk = cuda_upload_floats(L.bk, weight_bytes_);
        d.bv = cuda_upload_floats(L.bv, weight_bytes_);
        d.wq = cuda_upload_weight(L.wq, p + "attn_q", weight_bytes_);
        d.wk = cuda_upload_weight(L.wk, p + "attn_k", weight_bytes_);
        d.wv = cuda_upload_weight(L.wv, p + "attn_v", weight_bytes_);
        d.wo = cuda_upload_weight(L.wo, p + "attn_output", weight_bytes_);
        d.w_gate = cuda_upload_weight(L.w_gate, p + "ffn_gate", weight_bytes_);
        d.w_up = cuda_upload_weight(L.w_up, p + "ffn_up", weight_bytes_);
        d.w_down = cuda_upload_weight(L.w_down, p + "ffn_down", weight_bytes_);
        if (L.vst_q.valid()) {
            has_beacon_ = true;
            d.vst_q = cuda_upload_weight(L.vst_q, p + "vst_q", weight_bytes_);
            d.vst_k = cuda_upload_weight(L.vst_k, p + "vst_k", weight_bytes_);
            d.vst_v = cuda_upload_weight(L.vst_v, p + "vst_v", weight_bytes_);
            d.vst_bq = cuda_upload_floats(L.vst_bq, weight_bytes_);
            d.vst_bk = cuda_upload_floats(L.vst_bk, weight_bytes_);
            d.vst_bv = cuda_upload_floats(L.vst_bv, weight_bytes_);
        }
    }
    output_ = cuda_upload_weight(model.output_weight(), "output", weight_bytes_);
    output_norm_ = cuda_upload_floats(model.output_norm(), weight_bytes_);
}

// ------------------------------------------------------------------------------------ context

CudaContext::CudaContext(const CudaLlm& llm, int64_t n_ctx, int64_t n_batch, bool row_major)
    : llm_(llm), n_ctx_(n_ctx), n_batch_(n_batch) {
    if (n_ctx <= 0 || n_batch <= 0) throw Error("n_ctx and n_batch must be > 0");
    const LlmConfig& c = llm.config();
    cuda_set_device(llm.device());
    stream_.reset(new CudaStream(true));
    const int64_t E = c.n_embd, QD = static_cast<int64_t>(c.n_head) * c.head_dim,
                  KD = static_cast<int64_t>(c.n_head_kv) * c.head_dim, FF = c.n_ff, V = c.n_vocab;
    for (int l = 0; l < c.n_layer; ++l) {
        k_.emplace_back(static_cast<size_t>(n_ctx) * KD * kF16);
        v_.emplace_back(static_cast<size_t>(n_ctx) * KD * kF16);
    }
    const size_t f = sizeof(float);
    if (row_major) x_ = CudaDeviceBuffer(n_batch * E * f);  // forward_layer_major() keeps every row in x_all_
    xn_ = CudaDeviceBuffer(n_batch * std::max(E, QD) * f);
    q_ = CudaDeviceBuffer(n_batch * QD * f);
    k_new_ = CudaDeviceBuffer(n_batch * KD * f);
    v_new_ = CudaDeviceBuffer(n_batch * KD * f);
    attn_ = CudaDeviceBuffer(n_batch * QD * f);
    gate_ = CudaDeviceBuffer(n_batch * FF * f);
    up_ = CudaDeviceBuffer(n_batch * FF * f);
    pos_ = CudaDeviceBuffer(n_batch * sizeof(int32_t));
    if (row_major) logits_ = CudaDeviceBuffer(n_batch * V * f);
    attn_ws_ = CudaDeviceBuffer(cuda_attention_workspace_bytes(kMaxSplitRows, c.n_head, c.head_dim, kMaxSplits));
    lse_ = CudaDeviceBuffer(n_batch * c.n_head * f);
    tables_.resize(static_cast<size_t>(c.n_layer));
    set_prefix({}, 0);  // no prefix: the own entries at positions 0..
}

void CudaContext::set_prefix(std::vector<std::vector<CudaKVSegment>> per_layer, int32_t pos0, CudaPrefixHooks hooks) {
    if (!per_layer.empty() && per_layer.size() != k_.size()) throw Error("set_prefix: one segment list per layer");
    segments_ = std::move(per_layer);
    segments_.resize(k_.size());
    for (size_t l = 0; l < segments_.size(); ++l) {
        segments_[l].emplace_back();  // the slot of the cache's own entries, filled per forward
        // Size the device segment table now: a cudaMalloc inside the first forward would serialize
        // it with the reload copies in flight.
        tables_[l].reserve(static_cast<int>(segments_[l].size()));
    }
    pos0_ = pos0;
    hooks_ = std::move(hooks);
    n_past_ = 0;
    if (graph_) graph_->reset();  // it reads the old tables
}

void CudaContext::set_graphs(bool on) {
    graphs_ = on;
    if (!on && graph_) graph_->reset();
}

bool CudaContext::graph_eligible(const uint8_t* vst) const {
    return graphs_ && !vst && !votes_ && !q_capture_ && !hooks_.before && !hooks_.after;
}

size_t CudaContext::kv_bytes() const {
    const LlmConfig& c = llm_.config();
    return static_cast<size_t>(n_past_) * c.n_head_kv * c.head_dim * kF16 * 2 * c.n_layer;
}

size_t CudaContext::device_bytes() const {
    size_t b = 0;
    for (size_t l = 0; l < k_.size(); ++l) b += k_[l].size() + v_[l].size();
    for (const CudaDeviceBuffer* p : {&x_, &xn_, &q_, &k_new_, &v_new_, &attn_, &gate_, &up_, &pos_, &logits_, &attn_ws_, &lse_,
                                      &vst_ids_, &vst_x_, &vst_q_, &vst_k_, &vst_v_, &x_all_, &pos_all_})
        b += p->size();
    return b;
}

void CudaContext::set_observer(float* votes, int64_t votes_stride, int64_t obs_start) {
    if (votes && (votes_stride <= 0 || obs_start < 0)) throw Error("set_observer: bad stride or obs_start");
    votes_ = votes;
    votes_stride_ = votes_stride;
    obs_start_ = obs_start;
}

void CudaContext::set_query_capture(float* dst, int64_t rows) {
    if (dst && rows <= 0) throw Error("set_query_capture: rows must be > 0");
    q_capture_ = dst;
    q_capture_rows_ = dst ? rows : 0;
}

void CudaContext::truncate(int64_t n) {
    if (n < 0 || n > n_past_) throw Error("truncate: n out of range");
    n_past_ = n;  // later tokens overwrite the rows beyond n
}

void cuda_linear(const CudaMatrix& w, const float* x, int64_t n, float* y, const CudaDeviceBuffer& bias, void* stream,
                 MatmulKernel kernel) {
    cuda_matmul(w.type, w.buf.data(), w.n_out, w.n_in, x, n, y, stream, kernel);
    if (bias.size()) cuda_add(y, static_cast<const float*>(bias.data()), y, n * w.n_out, w.n_out, stream);
}

void CudaContext::matmul(const CudaLlm::Matrix& w, const float* x, int64_t n, float* y, const CudaDeviceBuffer& bias) {
    cuda_linear(w, x, n, y, bias, stream_->handle());
}

void CudaContext::forward(const float* x, int64_t n, int64_t n_logits, float* logits, const uint8_t* vst) {
    if (n <= 0) return;
    if (n_logits < 0 || n_logits > n) throw Error("invalid n_logits");
    if (vst && !llm_.has_beacon()) throw Error("this model has no beacon (VST) weights");
    if (x_.size() == 0) throw Error("this context runs forward_layer_major() only");
    if (n_past_ + n > n_ctx_) throw BudgetError("context is full");
    cuda_set_device(llm_.device());
    const int64_t before = n_past_, first_logit = n - n_logits;
    try {
        for (int64_t b = 0; b < n; b += n_batch_) {
            const int64_t m = std::min(n_batch_, n - b);
            // Rows of this batch among the last n_logits of the call: always the batch's last ones.
            const int64_t from = std::max(b, first_logit), k = std::max<int64_t>(0, b + m - from);
            forward_batch(x + b * llm_.config().n_embd, m, k, k ? logits + (from - first_logit) * llm_.config().n_vocab : nullptr,
                          vst ? vst + b : nullptr);
        }
    } catch (...) {
        n_past_ = before;
        throw;
    }
}

void CudaContext::eval(const float* x, int64_t n, std::vector<float>& last_logits, std::vector<float>* all_out) {
    const int64_t V = llm_.config().n_vocab;
    last_logits.resize(V);
    if (!all_out) {
        forward(x, n, 1, last_logits.data());
        return;
    }
    all_out->resize(static_cast<size_t>(n) * V);
    forward(x, n, n, all_out->data());
    std::copy_n(all_out->data() + (n - 1) * V, V, last_logits.data());
}

void CudaContext::eval_tokens(const LlmModel& model, const std::vector<int32_t>& tokens, std::vector<float>& last_logits,
                              std::vector<float>* all_out) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    std::vector<float> x(static_cast<size_t>(n) * llm_.config().n_embd);  // [n, n_embd]
    model.embed(tokens.data(), n, x.data());  // throws on an out-of-range id
    eval(x.data(), n, last_logits, all_out);
}

void CudaContext::beacon_qkv(const CudaLlm::Layer& L, int64_t n_vst, const int32_t* ids, float* q, float* k, float* v) {
    const LlmConfig& c = llm_.config();
    const int64_t E = c.n_embd, m = n_batch_;
    void* s = stream_->handle();
    float* vx = static_cast<float*>(vst_x_.data());
    cuda_get_rows(DType::F32, xn_.data(), m, E, ids, n_vst, vx, s);  // [n_vst, E]: the VST rows' normed inputs
    const std::pair<const CudaLlm::Matrix*, const CudaDeviceBuffer*> proj[3] = {
        {&L.vst_q, &L.vst_bq}, {&L.vst_k, &L.vst_bk}, {&L.vst_v, &L.vst_bv}};
    float* const out[3] = {q, k, v};
    const CudaDeviceBuffer* const tmp[3] = {&vst_q_, &vst_k_, &vst_v_};
    for (int i = 0; i < 3; ++i) {
        float* y = static_cast<float*>(tmp[i]->data());
        matmul(*proj[i].first, vx, n_vst, y, *proj[i].second);  // [n_vst, dim]
        cuda_set_rows(y, ids, n_vst, proj[i].first->n_out, out[i], m, s);
    }
}

// This batch's beacon rows (indices into it) in ids; the VST scratch buffers on first use.
int64_t CudaContext::vst_rows(const uint8_t* vst, int64_t m, std::vector<int32_t>& ids) {
    const size_t before = ids.size();
    for (int64_t i = 0; vst && i < m; ++i) {
        if (vst[i]) ids.push_back(static_cast<int32_t>(i));
    }
    const int64_t n_vst = static_cast<int64_t>(ids.size() - before);
    if (n_vst > 0 && !vst_x_.size()) {  // first beacon batch: room for a whole batch of VST rows
        const LlmConfig& c = llm_.config();
        const size_t f = sizeof(float), QD = static_cast<size_t>(c.n_head) * c.head_dim,
                     KD = static_cast<size_t>(c.n_head_kv) * c.head_dim;
        vst_x_ = CudaDeviceBuffer(n_batch_ * c.n_embd * f);
        vst_q_ = CudaDeviceBuffer(n_batch_ * QD * f);
        vst_k_ = CudaDeviceBuffer(n_batch_ * KD * f);
        vst_v_ = CudaDeviceBuffer(n_batch_ * KD * f);
    }
    return n_vst;
}

// Uploads n rows (x [n, n_embd] at the positions after the own entries, their VST flags) into x_buf and
// pos_buf and runs every layer over them, n_batch rows at a time, layer-major (one piece when n <= n_batch).
void CudaContext::run_rows(const float* x_host, int64_t n, const uint8_t* vst, CudaDeviceBuffer& x_buf,
                           CudaDeviceBuffer& pos_buf) {
    const LlmConfig& c = llm_.config();
    const int64_t E = c.n_embd, first = n_past_;
    check_rows(first + n);
    void* s = stream_->handle();
    std::vector<int32_t> pos_host(n), ids;        // ids: each piece's VST rows, piece after piece
    std::vector<std::pair<int64_t, int64_t>> at;  // per piece: its first VST id in ids, their count
    for (int64_t i = 0; i < n; ++i) pos_host[i] = static_cast<int32_t>(pos0_ + first + i);
    for (int64_t b = 0; b < n; b += n_batch_) {
        const int64_t off = static_cast<int64_t>(ids.size());
        at.emplace_back(off, vst_rows(vst ? vst + b : nullptr, std::min(n_batch_, n - b), ids));
    }
    // Pageable sources: the runtime stages them before returning, so the host vectors may go.
    x_buf.upload(x_host, static_cast<size_t>(n * E) * sizeof(float), 0, s);
    pos_buf.upload(pos_host.data(), static_cast<size_t>(n) * sizeof(int32_t), 0, s);
    if (!ids.empty()) {
        if (vst_ids_.size() < ids.size() * sizeof(int32_t))
            vst_ids_ = CudaDeviceBuffer(std::max<size_t>(ids.size(), n_batch_) * sizeof(int32_t));
        vst_ids_.upload(ids.data(), ids.size() * sizeof(int32_t), 0, s);
    }
    float* x = static_cast<float*>(x_buf.data());
    const int32_t* pos = static_cast<const int32_t*>(pos_buf.data());
    const int32_t* vst_ids = static_cast<const int32_t*>(vst_ids_.data());
    for (int l = 0; l < c.n_layer; ++l) {
        for (int64_t b = 0, k = 0; b < n; b += n_batch_, ++k) {
            const int64_t m = std::min(n_batch_, n - b);
            layer_rows(l, x + b * E, first + b, m, pos + b, at[k].second, vst_ids + at[k].first, b == 0, b + m == n);
        }
    }
}

void CudaContext::forward_batch(const float* x_host, int64_t m, int64_t n_logits, float* logits, const uint8_t* vst) {
    const LlmConfig& c = llm_.config();
    const int64_t E = c.n_embd;
    void* s = stream_->handle();
    if (m == 1 && graph_eligible(vst)) {
        try {
            decode_step(x_host, n_logits, logits);
            return;
        } catch (const BudgetError&) {
            throw;
        } catch (const Error& e) {
            if (graph_ && graph_->ready()) throw;  // a replay failed: the device is in trouble, not the capture
            // The driver would not capture this forward: run it as before, from now on.
            graphs_ = false;
            graph_stats_.note = e.what();
        }
    }
    run_rows(x_host, m, vst, x_, pos_);
    if (n_logits > 0) {
        const float* x = static_cast<const float*>(x_.data());
        float* xn = static_cast<float*>(xn_.data());
        cuda_rms_norm(x + (m - n_logits) * E, static_cast<const float*>(llm_.output_norm().data()), xn, n_logits, E,
                      c.rms_eps, s);
        matmul(llm_.output(), xn, n_logits, static_cast<float*>(logits_.data()), CudaDeviceBuffer());
        logits_.download(logits, n_logits * c.n_vocab * sizeof(float), 0, s);
    }
    stream_->synchronize();  // kernel faults surface here, before the batch counts as appended
    n_past_ += m;
}

// One token through the decode graph. The graph is captured here when there is none (first token after
// set_prefix(), or logits wanted now and not then): before the capture each layer's table gets the own
// entries' segment, whose length the attention then reads from step_ at every replay.
void CudaContext::decode_step(const float* x_host, int64_t n_logits, float* logits) {
    const LlmConfig& c = llm_.config();
    const int64_t E = c.n_embd, V = c.n_vocab;
    void* s = stream_->handle();
    const bool want_logits = n_logits > 0;
    constexpr size_t kStepInts = 3;  // pos, row, own entries after this token
    if (!step_host_) {
        step_host_.reset(new CudaHostBuffer(static_cast<size_t>(E) * sizeof(float) + kStepInts * sizeof(int32_t)));
        step_ = CudaDeviceBuffer(kStepInts * sizeof(int32_t));
    }
    if (want_logits && !logits_host_) logits_host_.reset(new CudaHostBuffer(static_cast<size_t>(V) * sizeof(float)));
    if (!graph_) graph_.reset(new CudaGraph);
    bool stale = !graph_->ready() || graph_logits_ != want_logits;
    for (size_t l = 0; !stale && l < tables_.size(); ++l) stale = tables_[l].device_data() != graph_tables_[l];
    float* x = static_cast<float*>(x_.data());
    uint8_t* staged = static_cast<uint8_t*>(step_host_->data());
    const int32_t* step = static_cast<const int32_t*>(step_.data());
    if (stale) {
        graph_->reset();
        graph_tables_.clear();
        for (int l = 0; l < c.n_layer; ++l) {
            segments_[l].back() = own_segment(l, n_past_ + 1);  // the kernel reads the count from step_
            tables_[l].assign(segments_[l], c.head_dim, s);
            graph_tables_.push_back(tables_[l].device_data());
        }
        graph_->capture(s, [&] {
            cuda_copy_h2d_async(x, staged, static_cast<size_t>(E) * sizeof(float), s);
            cuda_copy_h2d_async(step_.data(), staged + E * sizeof(float), kStepInts * sizeof(int32_t), s);
            for (int l = 0; l < c.n_layer; ++l) layer_rows(l, x, n_past_, 1, step, 0, nullptr, false, false, step);
            if (want_logits) {
                float* xn = static_cast<float*>(xn_.data());
                cuda_rms_norm(x, static_cast<const float*>(llm_.output_norm().data()), xn, 1, E, c.rms_eps, s);
                matmul(llm_.output(), xn, 1, static_cast<float*>(logits_.data()), CudaDeviceBuffer());
                cuda_copy_d2h_async(logits_host_->data(), logits_.data(), static_cast<size_t>(V) * sizeof(float), s);
            }
        });
        graph_logits_ = want_logits;
        ++graph_stats_.captures;
    }
    std::memcpy(staged, x_host, static_cast<size_t>(E) * sizeof(float));
    const int32_t ints[kStepInts] = {static_cast<int32_t>(pos0_ + n_past_), static_cast<int32_t>(n_past_),
                                     static_cast<int32_t>(n_past_ + 1)};
    std::memcpy(staged + E * sizeof(float), ints, sizeof(ints));
    graph_->launch(s);
    stream_->synchronize();  // the staging buffers are reused by the next token; faults surface here
    if (want_logits) std::memcpy(logits, logits_host_->data(), static_cast<size_t>(V) * sizeof(float));
    ++graph_stats_.replays;
    n_past_ += 1;
}

void CudaContext::forward_layer_major(const float* x_host, int64_t n, const uint8_t* vst) {
    if (n <= 0) return;
    if (vst && !llm_.has_beacon()) throw Error("this model has no beacon (VST) weights");
    if (n_past_ + n > n_ctx_) throw BudgetError("context is full");
    cuda_set_device(llm_.device());
    const size_t x_bytes = static_cast<size_t>(n * llm_.config().n_embd) * sizeof(float);
    if (x_all_.size() < x_bytes) {
        x_all_ = CudaDeviceBuffer();
        x_all_ = CudaDeviceBuffer(x_bytes);  // [n, n_embd]: every row's hidden state
        pos_all_ = CudaDeviceBuffer(static_cast<size_t>(n) * sizeof(int32_t));
    }
    run_rows(x_host, n, vst, x_all_, pos_all_);
    stream_->synchronize();  // kernel faults surface here, before the rows count as appended
    n_past_ += n;
}

CudaKVSegment CudaContext::own_segment(int l, int64_t n_tokens) const {
    const LlmConfig& c = llm_.config();
    CudaKVSegment seg;
    seg.k = k_[l].data();
    seg.v = v_[l].data();
    seg.k_tok_stride = seg.v_tok_stride = static_cast<int64_t>(c.n_head_kv) * c.head_dim * static_cast<int64_t>(kF16);
    seg.k_head_stride = seg.v_head_stride = c.head_dim * static_cast<int64_t>(kF16);
    seg.n_tokens = n_tokens;
    seg.k_type = seg.v_type = static_cast<uint32_t>(DType::F16);
    return seg;
}

void CudaContext::check_rows(int64_t end) const {
    if (votes_ && end > votes_stride_) throw Error("set_observer: votes_stride is smaller than the own entries");
    if (q_capture_ && end > q_capture_rows_) throw Error("set_query_capture: more rows than the capture holds");
}

void CudaContext::layer_rows(int l, float* x, int64_t first, int64_t m, const int32_t* pos, int64_t n_vst,
                             const int32_t* vst_ids, bool first_rows, bool last_rows, const int32_t* step) {
    const LlmConfig& c = llm_.config();
    const int64_t E = c.n_embd, QD = static_cast<int64_t>(c.n_head) * c.head_dim,
                  KD = static_cast<int64_t>(c.n_head_kv) * c.head_dim, FF = c.n_ff;
    void* s = stream_->handle();
    float* xn = static_cast<float*>(xn_.data());
    float* q = static_cast<float*>(q_.data());
    float* k = static_cast<float*>(k_new_.data());
    float* v = static_cast<float*>(v_new_.data());
    float* attn = static_cast<float*>(attn_.data());
    float* gate = static_cast<float*>(gate_.data());
    float* up = static_cast<float*>(up_.data());
    const RopeMode mode = c.rope_type == RopeType::Neox ? RopeMode::Neox : RopeMode::Norm;
    const CudaDeviceBuffer none;
    const CudaLlm::Layer& L = llm_.layers()[l];

    cuda_rms_norm(x, static_cast<const float*>(L.attn_norm.data()), xn, m, E, c.rms_eps, s);
    matmul(L.wq, xn, m, q, L.bq);  // [m, QD]
    matmul(L.wk, xn, m, k, L.bk);  // [m, KD]
    matmul(L.wv, xn, m, v, L.bv);  // [m, KD]
    if (n_vst > 0) beacon_qkv(L, n_vst, vst_ids, q, k, v);
    if (q_capture_) {
        cuda_copy_d2d_async(q_capture_ + (static_cast<int64_t>(l) * q_capture_rows_ + first) * QD, q,
                            static_cast<size_t>(m * QD) * sizeof(float), s);
    }
    cuda_rope(q, q, pos, m, c.n_head, c.head_dim, QD, c.rope_dim, c.rope_base, 1.0f, mode, s);
    cuda_rope(k, k, pos, m, c.n_head_kv, c.head_dim, KD, c.rope_dim, c.rope_base, 1.0f, mode, s);
    // Append to the f16 cache [n_ctx, n_head_kv, head_dim]: the rows are contiguous.
    uint8_t* kc = static_cast<uint8_t*>(k_[l].data());
    uint8_t* vc = static_cast<uint8_t*>(v_[l].data());
    CudaKVSegment& seg = segments_[l].back();  // the cache's own entries, after the prefix
    CudaAttentionParams p;
    if (step) {  // graph capture: the row, and the own entries' count, come from step at run time
        cuda_f32_to_f16_at(k, kc, KD, step + 1, KD, s);
        cuda_f32_to_f16_at(v, vc, KD, step + 1, KD, s);
        p.own_len = step + 2;
        p.own_max = n_ctx_;
    } else {
        cuda_f32_to_f16(k, kc + first * KD * kF16, m * KD, s);
        cuda_f32_to_f16(v, vc + first * KD * kF16, m * KD, s);
        seg = own_segment(l, first + m);
        if (first_rows && hooks_.before) hooks_.before(l, s, segments_[l]);
        tables_[l].assign(segments_[l], c.head_dim, s);
    }
    p.q = q;
    p.out = attn;
    p.n_q = static_cast<int>(m);
    p.n_head = c.n_head;
    p.n_kv_head = c.n_head_kv;
    p.head_dim = c.head_dim;
    p.causal = true;
    p.workspace = attn_ws_.data();
    p.workspace_bytes = attn_ws_.size();
    // Rows of this batch that vote: from the observation window's start on.
    const int obs_from = static_cast<int>(std::min<int64_t>(m, std::max<int64_t>(0, obs_start_ - first)));
    if (votes_) {
        p.lse = static_cast<float*>(lse_.data());
        p.lse_from = obs_from;
    }
    p.segments = tables_[l].device_data();
    p.n_segments = tables_[l].size();
    p.n_kv = step ? tables_[l].n_kv() - tables_[l].host().back().n_tokens + n_ctx_ : tables_[l].n_kv();
    cuda_attention(p, s);  // [m, QD]
    if (votes_) {
        cuda_attention_votes(q, QD, p.lse, static_cast<int>(m), c.n_head, c.n_head_kv, c.head_dim, 0.f, seg, first + m,
                             obs_from,
                             votes_ + static_cast<int64_t>(l) * c.n_head_kv * votes_stride_, votes_stride_, s);
    }
    if (last_rows && hooks_.after) hooks_.after(l, s);

    matmul(L.wo, attn, m, xn, none);
    cuda_add(x, xn, x, m * E, m * E, s);
    cuda_rms_norm(x, static_cast<const float*>(L.ffn_norm.data()), xn, m, E, c.rms_eps, s);
    matmul(L.w_gate, xn, m, gate, none);  // [m, FF]
    matmul(L.w_up, xn, m, up, none);      // [m, FF]
    cuda_swiglu(gate, up, gate, m * FF, s);
    matmul(L.w_down, gate, m, xn, none);  // [m, E]
    cuda_add(x, xn, x, m * E, m * E, s);
}

// ------------------------------------------------------------------------------------ X²L tiers

CudaKVSegment cuda_layer_view(const CudaKVRows& s, const uint8_t* k, const uint8_t* v) {
    // KVSegment rows are [layer][head][entry]: within a layer, head-major with cap entries per head.
    CudaKVSegment seg;
    seg.k = k;
    seg.v = v;
    seg.k_tok_stride = seg.v_tok_stride = static_cast<int64_t>(s.row_bytes);
    seg.k_head_stride = seg.v_head_stride = static_cast<int64_t>(s.row_bytes) * s.cap;
    seg.n_tokens = s.n;
    seg.k_type = seg.v_type = static_cast<uint32_t>(s.type);
    return seg;
}

namespace {

void check_kv_type(const KVSegment& seg, const char* what) {
    if (!cuda_kv_type_supported(seg.type()) || seg.head_dim() % static_cast<int>(type_info(seg.type()).block_size) != 0) {
        throw Error(std::string("the CUDA attention kernel cannot read the ") + what + " tier's " +
                    type_info(seg.type()).name + " rows (head_dim " + std::to_string(seg.head_dim()) +
                    "); index the video with f16/q8_0/q4_0 tiers or use device='cpu'");
    }
}

// `pipe`, reset, when its slots hold `need` bytes; otherwise a new one with n_slots slots of `alloc`
// (>= need) bytes, made after the old one is freed (the device may not hold both).
void reserve_pipeline(std::unique_ptr<CudaLayerPipeline>& pipe, size_t need, size_t alloc, int n_slots) {
    if (pipe && need <= pipe->slot_bytes()) {
        pipe->reset();
        return;
    }
    pipe.reset();
    pipe.reset(new CudaLayerPipeline(alloc, n_slots, false));
}

void fill_geometry(CudaKVRows& d, const KVSegment& seg) {
    d.layer_bytes = seg.layer_bytes();
    d.row_bytes = seg.row_bytes();
    d.cap = seg.capacity();
    d.n = seg.size();
    d.type = seg.type();
}

}  // namespace

CudaKVRows cuda_upload_rows(const KVSegment& seg, const char* what) {
    check_kv_type(seg, what);
    CudaKVRows d;
    fill_geometry(d, seg);
    const size_t block = d.layer_bytes * static_cast<size_t>(seg.n_layer());
    d.dev = CudaDeviceBuffer(std::max<size_t>(2 * block, 256));
    d.dev.upload(seg.k_data(), block, 0);
    d.dev.upload(seg.v_data(), block, block);
    d.k = static_cast<const uint8_t*>(d.dev.data());
    d.v = d.k + block;
    return d;
}

CudaKVRows cuda_pin_rows(const KVSegment& seg, const char* what, bool mapped) {
    check_kv_type(seg, what);
    CudaKVRows d;
    fill_geometry(d, seg);
    const size_t block = d.layer_bytes * static_cast<size_t>(seg.n_layer());
    const uint8_t* k = seg.k_data();
    const uint8_t* v = seg.v_data();
    if (block > 0 && v >= k + block && v <= k + block + 64) {  // K, then V (64-byte aligned): one range
        try {
            d.registered.reset(new CudaHostRegistration(k, static_cast<size_t>(v - k) + block, mapped));
        } catch (const Error&) {
            d.registered.reset();  // e.g. pages shared with a registered neighbour: copy instead
        }
    }
    // Mapped (integrated GPUs): the device reads the rows in place; otherwise they are a DMA source.
    if (d.registered) {
        d.k = mapped ? static_cast<const uint8_t*>(d.registered->device_ptr()) : k;
        d.v = d.k + (v - k);
    } else {
        d.host.reset(new CudaHostBuffer(std::max<size_t>(2 * block, 256), mapped));
        std::memcpy(d.host->data(), k, block);
        std::memcpy(static_cast<uint8_t*>(d.host->data()) + block, v, block);
        d.k = static_cast<const uint8_t*>(mapped ? d.host->device_ptr() : d.host->data());
        d.v = d.k + block;
    }
    return d;
}

CudaX2L::CudaX2L(const CudaLlm& llm, const VideoIndex& ix, int64_t max_tail_tokens, int64_t n_batch)
    : llm_(llm), ix_(ix) {
    cuda_set_device(llm.device());
    sink_ = cuda_upload_rows(*ix.sink, "sink");  // sink and H: resident on the device
    for (const auto& ch : ix.chunks) high_.push_back(cuda_upload_rows(*ch.high, "H"));
    for (const auto& ch : ix.chunks) low_.push_back(cuda_pin_rows(*ch.low, "L", llm.integrated()));  // the reload's source
    copy_begin_.reset(new CudaEvent(true));
    copy_end_.reset(new CudaEvent(true));
    ctx_.reset(new CudaContext(llm, max_tail_tokens, n_batch));
    prepare({});
}

CudaX2L::~CudaX2L() {
    try {
        cuda_set_device(llm_.device());
        wait_reload();  // no copy may target freed buffers
    } catch (...) {
    }
}

// The mixed cache's segments of every layer: sink, then per chunk its L rows (chosen) or H rows, read
// where `where` [layer][chunk] (K, V) says.
std::vector<std::vector<CudaKVSegment>> CudaX2L::build_prefix(const std::vector<char>& chosen, const Where& where) const {
    const int L = llm_.config().n_layer;
    const int n = static_cast<int>(ix_.chunks.size());
    std::vector<std::vector<CudaKVSegment>> per_layer(L);
    for (int l = 0; l < L; ++l) {
        auto& segs = per_layer[l];
        segs.push_back(cuda_layer_view(sink_, sink_.k + l * sink_.layer_bytes, sink_.v + l * sink_.layer_bytes));
        for (int c = 0; c < n; ++c) {
            segs.push_back(cuda_layer_view(chosen[c] ? low_[c] : high_[c], where[l][c].first, where[l][c].second));
        }
    }
    return per_layer;
}

// Where every chunk's rows live in the index: its L rows (chosen) or its H rows, not copied or rotated.
CudaX2L::Where CudaX2L::in_place(const std::vector<char>& chosen) const {
    const int L = llm_.config().n_layer;
    Where where(L);
    for (int l = 0; l < L; ++l) {
        for (size_t c = 0; c < chosen.size(); ++c) {
            const CudaKVRows& d = chosen[c] ? low_[c] : high_[c];
            where[l].emplace_back(d.k + l * d.layer_bytes, d.v + l * d.layer_bytes);
        }
    }
    return where;
}

// The position of the tail's first token in the mixed cache of `chosen`. With dense positions (beacon)
// each chunk's keys sit right after what precedes it, so delta (when non-null) gets how far each chunk
// moved from the positions it was made at.
int32_t CudaX2L::layout(const std::vector<char>& chosen, std::vector<int32_t>* delta) const {
    if (delta) delta->assign(chosen.size(), 0);
    if (!ix_.dense_positions) return ix_.next_pos;
    int32_t next = static_cast<int32_t>(ix_.sink->size());
    for (size_t c = 0; c < chosen.size(); ++c) {
        const KVSegment& seg = chosen[c] ? *ix_.chunks[c].low : *ix_.chunks[c].high;
        if (delta && seg.size() > 0) (*delta)[c] = next - seg.pos(0);
        next += static_cast<int32_t>(seg.size());
    }
    return next;
}

void CudaX2L::prepare(const std::vector<int>& selected) {
    const LlmConfig& cfg = llm_.config();
    const int L = cfg.n_layer;
    const int n = static_cast<int>(ix_.chunks.size());
    for (size_t i = 0; i < selected.size(); ++i) {
        if (selected[i] < 0 || selected[i] >= n || (i > 0 && selected[i] <= selected[i - 1]))
            throw Error("CudaX2L::prepare: selection must be sorted, unique chunk indices");
    }
    cuda_set_device(llm_.device());
    wait_reload();
    cuda_device_synchronize();  // the tail's stream is done with the previous working set
    // From here on the context must never keep a prefix into buffers that a failure below frees: it is
    // first emptied, then given the mixed cache once it is built (the H-only one if the copy fails).
    ctx_->set_prefix({}, ix_.next_pos);
    selected_.clear();
    stats_ = ReloadStats();
    std::vector<char> chosen(static_cast<size_t>(n), 0);
    for (int c : selected) chosen[c] = 1;
    // Dense positions (beacon): a chunk behind one that changed tier moves by delta positions; its keys
    // get a re-rotated copy in the working set (V does not depend on the position and is read where it is).
    std::vector<int32_t> delta;
    const int32_t tail_pos = layout(chosen, &delta);
    const bool discrete = !llm_.integrated();  // integrated: L rows are read in place, never copied
    size_t slot = 0;                           // working-set bytes per layer
    for (int c = 0; c < n; ++c) {
        if (chosen[c] && discrete) {
            slot += 2 * CudaLayerPipeline::aligned(low_[c].layer_bytes);
        } else if (delta[c] != 0) {
            slot += CudaLayerPipeline::aligned((chosen[c] ? low_[c] : high_[c]).layer_bytes);
        }
    }
    const bool staged = slot > 0;
    const RopeMode mode = cfg.rope_type == RopeType::Neox ? RopeMode::Neox : RopeMode::Norm;
    Where where = in_place(chosen);  // [layer][chunk] -> that chunk's K and V rows of the layer for this question
    try {
        if (staged) {
            reserve_pipeline(pipe_, slot, slot, L);
            void* cs = pipe_->copy_stream();
            copy_begin_->record(cs);
            if (landed_.size() != static_cast<size_t>(L)) {
                landed_.clear();
                reached_.clear();
                for (int l = 0; l < L; ++l) {
                    landed_.emplace_back(true);
                    reached_.emplace_back(true);
                }
            }
            reached_recorded_.assign(static_cast<size_t>(L), 0);
            for (int l = 0; l < L; ++l) {
                pipe_->begin(l);
                for (int c = 0; c < n; ++c) {
                    const CudaKVRows& d = chosen[c] ? low_[c] : high_[c];
                    const size_t off = static_cast<size_t>(l) * d.layer_bytes;
                    const int64_t rows = static_cast<int64_t>(cfg.n_head_kv) * d.cap;  // the layer's K block
                    auto& [k, v] = where[l][c];
                    if (chosen[c] && discrete) {  // the reload: host -> working set, keys rotated there
                        void* kd = pipe_->stage(d.k + off, d.layer_bytes);
                        v = static_cast<const uint8_t*>(pipe_->stage(d.v + off, d.layer_bytes));
                        stats_.bytes += 2 * d.layer_bytes;
                        if (delta[c] != 0)
                            cuda_rerotate_keys(d.type, kd, kd, rows, d.row_bytes, cfg.head_dim, cfg.rope_dim, cfg.rope_base,
                                               mode, delta[c], cs);
                        k = static_cast<const uint8_t*>(kd);
                    } else if (delta[c] != 0) {  // a rotated copy of the keys, read from where they are
                        void* kd = pipe_->take(d.layer_bytes);
                        cuda_rerotate_keys(d.type, d.k + off, kd, rows, d.row_bytes, cfg.head_dim, cfg.rope_dim, cfg.rope_base,
                                           mode, delta[c], cs);
                        k = static_cast<const uint8_t*>(kd);
                    }
                }
                pipe_->end();
                landed_[l].record(cs);
            }
            copy_end_->record(cs);
            pending_ = true;
        }
    } catch (...) {
        // Leave the H-only mixed cache: no chunk reloaded, nothing pointing into freed slots. (With
        // dense positions the H-only cache needs no rotation: H rows were made at these positions.)
        try {
            if (pipe_) pipe_->reset();
        } catch (...) {
        }
        pending_ = false;
        stats_ = ReloadStats();
        const std::vector<char> none(static_cast<size_t>(n), 0);
        ctx_->set_prefix(build_prefix(none, in_place(none)), layout(none, nullptr));
        throw;
    }
    CudaPrefixHooks wait;
    if (staged) {
        wait.before = [this](int layer, void* stream, std::vector<CudaKVSegment>&) {
            if (!pipe_) return;
            if (!reached_recorded_[layer]) {  // the first batch is the one that can stall
                reached_[layer].record(stream);
                reached_recorded_[layer] = 1;
            }
            pipe_->wait_ready(layer, stream);
        };
    }
    ctx_->set_prefix(build_prefix(chosen, where), tail_pos, std::move(wait));
    stats_.n_chunks = static_cast<int>(selected.size());
    selected_ = selected;
}

std::vector<float> CudaX2L::question_queries(const LlmModel& model, const std::vector<int32_t>& tokens) {
    const LlmConfig& c = llm_.config();
    const int64_t nq = static_cast<int64_t>(tokens.size());
    if (nq == 0) throw Error("the question is empty");
    const int64_t QD = static_cast<int64_t>(c.n_head) * c.head_dim;
    prepare({});  // H-only: the video as this question sees it without reload
    CudaDeviceBuffer captured(static_cast<size_t>(c.n_layer * nq * QD) * sizeof(float));  // [n_layer, nq, QD]
    ctx_->set_query_capture(static_cast<float*>(captured.data()), nq);
    std::vector<float> last_logits;
    try {
        ctx_->eval_tokens(model, tokens, last_logits, nullptr);  // synchronizes
    } catch (...) {
        ctx_->set_query_capture(nullptr, 0);
        throw;
    }
    ctx_->set_query_capture(nullptr, 0);
    ctx_->truncate(0);
    std::vector<float> q(static_cast<size_t>(c.n_layer * nq * QD));
    captured.download(q.data(), q.size() * sizeof(float));
    return q;
}

void CudaX2L::wait_reload() {
    if (!pending_) return;
    cuda_set_device(llm_.device());
    const auto t0 = std::chrono::steady_clock::now();
    copy_end_->synchronize();
    stats_.copy_seconds = copy_end_->elapsed_ms_since(*copy_begin_) / 1e3;
    bool any_reached = false;
    double stalled_ms = 0;
    for (size_t l = 0; l < reached_recorded_.size(); ++l) {
        if (!reached_recorded_[l]) continue;
        any_reached = true;
        reached_[l].synchronize();
        stalled_ms += std::max(0.0f, landed_[l].elapsed_ms_since(reached_[l]));  // > 0: compute got there first
    }
    // Nothing reached yet: the host blocked here, before the question (reload, wait, then prefill).
    stats_.wait_seconds = any_reached ? stalled_ms / 1e3
                                      : std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    pending_ = false;
    // Every copy has landed and the stalls are counted: the per-layer waits have nothing left to do,
    // and without hooks the tokens that follow can replay the decode graph.
    ctx_->drop_hooks();
}

size_t CudaX2L::working_bytes() const { return pipe_ ? pipe_->slot_bytes() * static_cast<size_t>(pipe_->n_slots()) : 0; }

size_t CudaX2L::resident_bytes() const {
    size_t b = sink_.dev.size() + working_bytes() + ctx_->device_bytes();
    for (const auto& h : high_) b += h.dev.size();
    return b;
}

// ------------------------------------------------------------------------------------ prefill

CudaPrefill::CudaPrefill(const CudaLlm& llm, int64_t n_batch, int64_t low_cache_bytes) : llm_(llm), n_batch_(n_batch) {
    if (n_batch <= 0) throw Error("n_batch must be > 0");
    cuda_set_device(llm.device());
    // Integrated GPUs read the L rows in place: a device copy would only duplicate them in the same DRAM.
    if (llm.integrated()) {
        low_budget_ = 0;
    } else {
        low_budget_ = low_cache_bytes >= 0 ? static_cast<size_t>(low_cache_bytes) : cuda_device_info(llm.device()).free_mem / 2;
    }
}

CudaPrefill::~CudaPrefill() {
    try {
        cuda_set_device(llm_.device());
        cuda_device_synchronize();  // no kernel or copy may still touch what the members free
    } catch (...) {
    }
}

namespace {
// The rows cached for seg, if they are still its rows (a segment is never refilled while the prefill runs).
const CudaKVRows* find_rows(const std::deque<std::pair<const KVSegment*, CudaKVRows>>& cache, const KVSegment* seg) {
    for (const auto& r : cache) {
        if (r.first == seg && r.second.n == seg->size() && r.second.cap == seg->capacity()) return &r.second;
    }
    return nullptr;
}
}  // namespace

const CudaKVRows& CudaPrefill::resident(const KVSegment* seg) {
    if (const CudaKVRows* r = find_rows(resident_, seg)) return *r;
    resident_.emplace_back(seg, cuda_upload_rows(*seg, "prefix"));
    return resident_.back().second;
}

// seg's rows in device memory when they are cached there or fit the L cache's budget (nullptr: stream them).
const CudaKVRows* CudaPrefill::low_cached(const KVSegment* seg) {
    if (const CudaKVRows* r = find_rows(low_cached_, seg)) return r;
    if (cached_low_bytes() + 2 * seg->layer_bytes() * static_cast<size_t>(seg->n_layer()) > low_budget_) return nullptr;
    try {
        low_cached_.emplace_back(seg, cuda_upload_rows(*seg, "L"));
    } catch (const BudgetError&) {
        low_budget_ = 0;  // the device is fuller than it was: stream from now on
        return nullptr;
    }
    return &low_cached_.back().second;
}

const CudaKVRows& CudaPrefill::pinned(const KVSegment* seg) {
    if (const CudaKVRows* r = find_rows(pinned_, seg)) return *r;
    pinned_.emplace_back(seg, cuda_pin_rows(*seg, "L", llm_.integrated()));
    return pinned_.back().second;
}

// Runs `alloc`; when the device is full and L rows are cached there, drops that cache for good (the
// L prefix is streamed from then on) and tries again. Only while no view of the cache is in use.
template <typename Fn>
void CudaPrefill::with_room(Fn&& alloc) {
    try {
        alloc();
    } catch (const BudgetError&) {
        if (low_cached_.empty()) throw;
        cuda_device_synchronize();
        low_cached_.clear();
        low_budget_ = 0;
        alloc();
    }
}

size_t CudaPrefill::cached_low_bytes() const {
    size_t b = 0;
    for (const auto& r : low_cached_) b += r.second.dev.size();
    return b;
}

size_t CudaPrefill::device_bytes() const {
    size_t b = votes_.size() + (ctx_ ? ctx_->device_bytes() : 0);
    for (const auto& r : resident_) b += r.second.dev.size();
    b += cached_low_bytes();
    if (pipe_) b += pipe_->slot_bytes() * static_cast<size_t>(pipe_->n_slots());
    return b;
}

void CudaPrefill::run(const float* x, int64_t n, int32_t pos0, const std::vector<PrefixSegment>& prefix, int64_t obs_start,
                       KVSegment& tail, std::vector<float>* importance, const uint8_t* vst, const std::vector<int32_t>* keep) {
    const LlmConfig& c = llm_.config();
    if (n <= 0) throw Error("CudaPrefill::run: empty input");
    if (tail.size() != 0 || tail.capacity() < n) throw Error("CudaPrefill::run: the tail must be empty and hold n entries");
    for (size_t j = 0; keep && j < keep->size(); ++j) {
        if ((*keep)[j] < 0 || (*keep)[j] >= n || (j > 0 && (*keep)[j] <= (*keep)[j - 1]))
            throw Error("CudaPrefill::run: keep must be sorted, unique rows in [0, n)");
    }
    cuda_set_device(llm_.device());
    const int64_t HK = static_cast<int64_t>(c.n_head_kv) * c.n_layer;
    for (const PrefixSegment& p : prefix) {
        if (!p.seg) throw Error("CudaPrefill::run: null prefix segment");
    }
    // Device memory this run needs comes first (it may evict the L cache: no view of it exists yet).
    if (!ctx_ || ctx_->n_ctx() < n) {
        ctx_.reset();
        votes_ = CudaDeviceBuffer();
        with_room([&] {
            ctx_.reset(new CudaContext(llm_, n, n_batch_, /*row_major=*/false));
            votes_ = CudaDeviceBuffer(static_cast<size_t>(HK * n) * sizeof(float));
        });
    }
    for (const PrefixSegment& p : prefix) {
        if (!p.on_host && p.seg->size() > 0) with_room([&] { resident(p.seg); });
    }
    const int L = c.n_layer;
    std::vector<const CudaKVRows*> streamed;  // discrete GPUs: L-tier segments copied per layer
    std::vector<size_t> streamed_at;          // their places in a layer's segment list
    int64_t step = 0, staged = 0;             // layers attended to / copied so far (the forward is layer-major)
    std::vector<std::vector<std::pair<const void*, const void*>>> where(kCopySlots);  // [slot][streamed] K, V
    // The context's prefix: per layer, resident views (sink, H, cached L), mapped views (integrated), and
    // placeholders that the hooks point at the copy slot holding that layer of the streamed segments. If
    // the copy slots or the segment tables do not fit while L rows are cached, the cache goes and the
    // prefix is made again, streaming those rows.
    with_room([&] {
        streamed.clear();
        streamed_at.clear();
        try {
            std::vector<std::vector<CudaKVSegment>> per_layer(static_cast<size_t>(L));
            for (const PrefixSegment& p : prefix) {
                if (p.seg->size() == 0) continue;
                const CudaKVRows* cached = p.on_host && !llm_.integrated() ? low_cached(p.seg) : nullptr;
                const CudaKVRows& r = cached ? *cached : p.on_host ? pinned(p.seg) : resident(p.seg);
                const bool copied = p.on_host && !llm_.integrated() && !cached;
                if (copied) {
                    streamed.push_back(&r);
                    streamed_at.push_back(per_layer[0].size());
                }
                for (int l = 0; l < L; ++l) {
                    per_layer[l].push_back(copied ? cuda_layer_view(r, nullptr, nullptr)
                                                  : cuda_layer_view(r, r.k + l * r.layer_bytes, r.v + l * r.layer_bytes));
                }
            }
            CudaPrefixHooks hooks;
            if (!streamed.empty()) {
                size_t slot = 0;
                for (const CudaKVRows* r : streamed) slot += 2 * CudaLayerPipeline::aligned(r->layer_bytes);
                // The prefix grows by one chunk per level: room for a few more, so that the slots are not
                // reallocated for every chunk.
                reserve_pipeline(pipe_, slot, slot + slot / 4, kCopySlots);
                // The forward runs every row through layer l before layer l + 1 (forward_layer_major), so
                // each layer of the L prefix is copied once per run: layer t is staged in slot t % kCopySlots
                // once layer t - kCopySlots released it, and the copy of the next layer overlaps this
                // one's compute.
                auto stage = [&](int64_t t) {
                    pipe_->begin(static_cast<int>(t));
                    auto& w = where[static_cast<size_t>(t % kCopySlots)];
                    w.clear();
                    for (const CudaKVRows* r : streamed) {
                        const size_t off = static_cast<size_t>(t) * r->layer_bytes;
                        const void* k = pipe_->stage(r->k + off, r->layer_bytes);
                        const void* v = pipe_->stage(r->v + off, r->layer_bytes);
                        w.emplace_back(k, v);
                        streamed_bytes_ += 2 * r->layer_bytes;
                    }
                    pipe_->end();
                };
                hooks.before = [&, L, stage](int, void* stream, std::vector<CudaKVSegment>& segs) {
                    while (staged < L && staged <= step + kCopySlots - 1) stage(staged++);
                    pipe_->wait_ready(static_cast<int>(step), stream);
                    const auto& w = where[static_cast<size_t>(step % kCopySlots)];
                    for (size_t j = 0; j < streamed.size(); ++j) {
                        segs[streamed_at[j]].k = w[j].first;
                        segs[streamed_at[j]].v = w[j].second;
                    }
                };
                hooks.after = [&](int, void* stream) {
                    pipe_->release(static_cast<int>(step), stream);
                    ++step;
                };
            }
            ctx_->set_prefix(std::move(per_layer), pos0, std::move(hooks));
        } catch (...) {
            ctx_->set_prefix({}, 0);  // a failed attempt leaves no view of the L cache behind
            throw;
        }
    });
    if (importance) {
        votes_.zero(ctx_->stream());
        ctx_->set_observer(static_cast<float*>(votes_.data()), n, obs_start);  // [n_layer, n_head_kv, n]
    } else {
        ctx_->set_observer(nullptr, 0, 0);
    }
    try {
        ctx_->forward_layer_major(x, n, vst);  // synchronizes: the rows and votes are complete
    } catch (...) {
        // The hooks point into this frame, and queued work may still read the copy slots.
        try {
            cuda_device_synchronize();
            ctx_->set_prefix({}, 0);
            if (pipe_) pipe_->reset();
        } catch (...) {
        }
        throw;
    }
    // Drop the hooks (they point into this frame). This empties the context's count of own entries;
    // their rows stay in its K/V buffers, read below.
    ctx_->set_prefix({}, 0);
    peak_bytes_ = std::max(peak_bytes_, device_bytes());

    // The new entries back to the host: [n, n_head_kv, head_dim] f16 per layer -> tail's layout and type.
    // With `keep` only those rows cross (gathered on the device first); the tail's other rows stay unset.
    const int64_t KD = static_cast<int64_t>(c.n_head_kv) * c.head_dim;
    std::vector<int32_t> pos(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) pos[i] = pos0 + static_cast<int32_t>(i);
    tail.append(pos.data(), n);
    const size_t row_bytes = static_cast<size_t>(KD) * kF16;
    CudaDeviceBuffer keep_ids, gathered;  // [n_rows] row ids; [2][n_rows, KD] f16 K, then V
    const int64_t n_rows = keep ? static_cast<int64_t>(keep->size()) : n;
    if (keep && n_rows < n && n_rows > 0) {
        try {
            keep_ids = CudaDeviceBuffer(static_cast<size_t>(n_rows) * sizeof(int32_t));
            gathered = CudaDeviceBuffer(2 * static_cast<size_t>(n_rows) * row_bytes);
            keep_ids.upload(keep->data(), keep_ids.size());
        } catch (const BudgetError&) {
            keep_ids = CudaDeviceBuffer();  // no room to gather: fetch every row instead
            gathered = CudaDeviceBuffer();
        }
    }
    const bool gather = gathered.size() > 0;
    const int64_t n_fetch = gather ? n_rows : n;
    std::vector<uint16_t> kh(static_cast<size_t>(n_fetch * KD)), vh(kh.size());
    std::vector<float> kf(static_cast<size_t>(KD)), vf(kf.size());
    const size_t head_bytes = static_cast<size_t>(c.head_dim) * kF16;
    const size_t fetch_bytes = static_cast<size_t>(n_fetch) * row_bytes;
    void* s = ctx_->stream();
    for (int l = 0; l < c.n_layer; ++l) {
        if (gather) {
            uint8_t* g = static_cast<uint8_t*>(gathered.data());
            const int32_t* ids = static_cast<const int32_t*>(keep_ids.data());
            cuda_gather_rows(ctx_->k_cache(l).data(), n, row_bytes, ids, n_rows, g, s);
            cuda_gather_rows(ctx_->v_cache(l).data(), n, row_bytes, ids, n_rows, g + fetch_bytes, s);
            gathered.download(kh.data(), fetch_bytes, 0, s);  // pageable destination: complete on return
            gathered.download(vh.data(), fetch_bytes, fetch_bytes, s);
        } else {
            ctx_->k_cache(l).download(kh.data(), fetch_bytes, 0, s);
            ctx_->v_cache(l).download(vh.data(), fetch_bytes, 0, s);
        }
        fetched_bytes_ += 2 * fetch_bytes;
        for (int64_t j = 0; j < n_rows; ++j) {
            const int64_t i = keep ? (*keep)[j] : j;  // the tail's row
            const int64_t f = gather ? j : i;         // the fetched row
            if (tail.type() == DType::F16) {  // the usual case (kv_type f16): the rows as they are
                for (int h = 0; h < c.n_head_kv; ++h) {
                    std::memcpy(tail.k_row_mut(l, h, i), kh.data() + f * KD + h * c.head_dim, head_bytes);
                    std::memcpy(tail.v_row_mut(l, h, i), vh.data() + f * KD + h * c.head_dim, head_bytes);
                }
                continue;
            }
            fp16_to_fp32_row(kh.data() + f * KD, kf.data(), KD);
            fp16_to_fp32_row(vh.data() + f * KD, vf.data(), KD);
            tail.store(l, i, kf.data(), vf.data());
        }
    }
    if (importance) {
        importance->resize(static_cast<size_t>(HK * n));
        votes_.download(importance->data(), importance->size() * sizeof(float));
        ctx_->set_observer(nullptr, 0, 0);
    }
}

}  // namespace x2l
