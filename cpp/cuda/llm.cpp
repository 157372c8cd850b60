#include "cuda/llm.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/common.h"
#include "cuda/layer_gate.h"

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

CudaLlm::CudaLlm(const LlmModel& model, int device) : cfg_(model.config()), mrope_(model.rope_axes()), device_(device) {
    cuda_require_device(device);
    const LlmConfig& c = cfg_;
    if (c.head_dim % 4 != 0 || c.head_dim > 256) throw Error("the CUDA attention kernel needs head_dim % 4 == 0 and <= 256");
    if (c.n_pos_axes > 1 && (mrope_.n_axes != c.n_pos_axes || mrope_.head_dim != c.head_dim)) {
        throw Error("the model's M-RoPE axes do not match its head_dim");
    }
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
    pos_ = CudaDeviceBuffer(n_batch * c.n_pos_axes * sizeof(int32_t));  // [n_pos_axes, n_batch]
    if (row_major) logits_ = CudaDeviceBuffer(n_batch * V * f);
    attn_ws_ = CudaDeviceBuffer(cuda_attention_workspace_bytes(kMaxSplitRows, c.n_head, c.head_dim, kMaxSplits));
    lse_ = CudaDeviceBuffer(n_batch * c.n_head * f);
    tables_.resize(static_cast<size_t>(c.n_layer));
    set_prefix({});  // no prefix
}

void CudaContext::set_prefix(std::vector<std::vector<CudaKVSegment>> per_layer, CudaPrefixHooks hooks) {
    if (!per_layer.empty() && per_layer.size() != k_.size()) throw Error("set_prefix: one segment list per layer");
    segments_ = std::move(per_layer);
    segments_.resize(k_.size());
    for (size_t l = 0; l < segments_.size(); ++l) {
        segments_[l].emplace_back();  // the slot of the cache's own entries, filled per forward
        // Size the device segment table now: a cudaMalloc inside the first forward would serialize
        // it with the reload copies in flight.
        tables_[l].reserve(static_cast<int>(segments_[l].size()));
    }
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

void CudaContext::set_observer(float* votes, int64_t votes_stride, int64_t obs_start, bool max_pool) {
    if (votes && (votes_stride <= 0 || obs_start < 0)) throw Error("set_observer: bad stride or obs_start");
    votes_ = votes;
    votes_stride_ = votes_stride;
    obs_start_ = obs_start;
    votes_max_ = max_pool;
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

void CudaContext::forward(const float* x, int64_t n, const int32_t* pos, int64_t n_logits, float* logits,
                          const uint8_t* vst) {
    if (n <= 0) return;
    if (n_logits < 0 || n_logits > n) throw Error("invalid n_logits");
    if (vst && !llm_.has_beacon()) throw Error("this model has no beacon (VST) weights");
    if (x_.size() == 0) throw Error("this context runs forward_layer_major() only");
    if (n_past_ + n > n_ctx_) throw BudgetError("context is full");
    cuda_set_device(llm_.device());
    const int64_t before = n_past_, first_logit = n - n_logits;
    const int A = llm_.config().n_pos_axes;
    std::vector<int32_t> piece_pos;  // [A, m]: a piece's rows of pos [A, n] (M-RoPE)
    try {
        for (int64_t b = 0; b < n; b += n_batch_) {
            const int64_t m = std::min(n_batch_, n - b);
            // Rows of this batch among the last n_logits of the call: always the batch's last ones.
            const int64_t from = std::max(b, first_logit), k = std::max<int64_t>(0, b + m - from);
            const int32_t* p = pos + b;
            if (A > 1) {
                piece_pos.resize(static_cast<size_t>(A * m));
                for (int a = 0; a < A; ++a) std::copy(pos + a * n + b, pos + a * n + b + m, piece_pos.data() + a * m);
                p = piece_pos.data();
            }
            forward_batch(x + b * llm_.config().n_embd, m, p, k,
                          k ? logits + (from - first_logit) * llm_.config().n_vocab : nullptr, vst ? vst + b : nullptr);
        }
    } catch (...) {
        n_past_ = before;
        throw;
    }
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

// Uploads n rows (x [n, n_embd] at positions pos [n_pos_axes, n], their VST flags) into x_buf and pos_buf and runs
// every layer over them, n_batch rows at a time, layer-major (one piece when n <= n_batch).
void CudaContext::run_rows(const float* x_host, int64_t n, const int32_t* pos_host, const uint8_t* vst,
                           CudaDeviceBuffer& x_buf, CudaDeviceBuffer& pos_buf, bool check_layers) {
    const LlmConfig& c = llm_.config();
    const int64_t E = c.n_embd, first = n_past_;
    check_rows(first + n);
    void* s = stream_->handle();
    std::vector<int32_t> ids;                     // each piece's VST rows, piece after piece
    std::vector<std::pair<int64_t, int64_t>> at;  // per piece: its first VST id in ids, their count
    for (int64_t b = 0; b < n; b += n_batch_) {
        const int64_t off = static_cast<int64_t>(ids.size());
        at.emplace_back(off, vst_rows(vst ? vst + b : nullptr, std::min(n_batch_, n - b), ids));
    }
    // Pageable sources, staged through pinned memory (a pageable cudaMemcpyAsync would synchronize):
    // the host vectors may go on return.
    const size_t x_bytes = static_cast<size_t>(n * E) * sizeof(float),
                 pos_bytes = static_cast<size_t>(n) * c.n_pos_axes * sizeof(int32_t);
    if (x_bytes > x_buf.size() || pos_bytes > pos_buf.size()) throw Error("CudaContext::run_rows: more rows than the buffers hold");
    staging_.upload(x_buf.data(), x_host, x_bytes, s);
    staging_.upload(pos_buf.data(), pos_host, pos_bytes, s);
    if (!ids.empty()) {
        if (vst_ids_.size() < ids.size() * sizeof(int32_t))
            vst_ids_ = CudaDeviceBuffer(std::max<size_t>(ids.size(), n_batch_) * sizeof(int32_t));
        staging_.upload(vst_ids_.data(), ids.data(), ids.size() * sizeof(int32_t), s);
    }
    float* x = static_cast<float*>(x_buf.data());
    const int32_t* pos = static_cast<const int32_t*>(pos_buf.data());
    const int32_t* vst_ids = static_cast<const int32_t*>(vst_ids_.data());
    CudaLayerGate gate(check_layers ? interrupt_ : nullptr, s);
    for (int l = 0; l < c.n_layer; ++l) {
        gate.before_layer(l);
        for (int64_t b = 0, k = 0; b < n; b += n_batch_, ++k) {
            const int64_t m = std::min(n_batch_, n - b);
            layer_rows(l, x + b * E, first + b, m, pos + b, n, at[k].second, vst_ids + at[k].first, b == 0, b + m == n);
        }
        gate.after_layer(l);
    }
}

void CudaContext::forward_batch(const float* x_host, int64_t m, const int32_t* pos_host, int64_t n_logits, float* logits,
                                const uint8_t* vst) {
    const LlmConfig& c = llm_.config();
    const int64_t E = c.n_embd;
    void* s = stream_->handle();
    // The graph reads one position for every axis: an M-RoPE row at distinct (t, h, w) runs without it.
    bool one_pos = true;
    for (int a = 1; a < c.n_pos_axes; ++a) one_pos = one_pos && pos_host[a] == pos_host[0];
    if (m == 1 && one_pos && graph_eligible(vst)) {
        try {
            decode_step(x_host, pos_host[0], n_logits, logits);
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
    run_rows(x_host, m, pos_host, vst, x_, pos_, false);
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
void CudaContext::decode_step(const float* x_host, int32_t pos, int64_t n_logits, float* logits) {
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
            for (int l = 0; l < c.n_layer; ++l) layer_rows(l, x, n_past_, 1, step, 0, 0, nullptr, false, false, step);
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
    const int32_t ints[kStepInts] = {pos, static_cast<int32_t>(n_past_),
                                     static_cast<int32_t>(n_past_ + 1)};
    std::memcpy(staged + E * sizeof(float), ints, sizeof(ints));
    graph_->launch(s);
    stream_->synchronize();  // the staging buffers are reused by the next token; faults surface here
    if (want_logits) std::memcpy(logits, logits_host_->data(), static_cast<size_t>(V) * sizeof(float));
    ++graph_stats_.replays;
    n_past_ += 1;
}

void CudaContext::forward_layer_major(const float* x_host, int64_t n, const int32_t* pos_host, const uint8_t* vst) {
    if (n <= 0) return;
    if (vst && !llm_.has_beacon()) throw Error("this model has no beacon (VST) weights");
    if (n_past_ + n > n_ctx_) throw BudgetError("context is full");
    cuda_set_device(llm_.device());
    const size_t x_bytes = static_cast<size_t>(n * llm_.config().n_embd) * sizeof(float);
    if (x_all_.size() < x_bytes) {
        x_all_ = CudaDeviceBuffer();
        x_all_ = CudaDeviceBuffer(x_bytes);  // [n, n_embd]: every row's hidden state
        pos_all_ = CudaDeviceBuffer(static_cast<size_t>(n) * llm_.config().n_pos_axes * sizeof(int32_t));  // [n_pos_axes, n]
    }
    run_rows(x_host, n, pos_host, vst, x_all_, pos_all_, true);
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

void CudaContext::layer_rows(int l, float* x, int64_t first, int64_t m, const int32_t* pos, int64_t pos_axis_stride,
                             int64_t n_vst,
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
    if (c.n_pos_axes > 1) {  // M-RoPE: pairs over the (t, h, w) position rows
        const RopeAxes& ra = llm_.rope_axes();
        cuda_rope_axes(q, q, pos, pos_axis_stride, m, c.n_head, c.head_dim, QD, ra.freq.data(), ra.axis.data(), ra.n_axes, s);
        cuda_rope_axes(k, k, pos, pos_axis_stride, m, c.n_head_kv, c.head_dim, KD, ra.freq.data(), ra.axis.data(),
                       ra.n_axes, s);
    } else {
        cuda_rope(q, q, pos, m, c.n_head, c.head_dim, QD, c.rope_dim, c.rope_base, 1.0f, mode, s);
        cuda_rope(k, k, pos, m, c.n_head_kv, c.head_dim, KD, c.rope_dim, c.rope_base, 1.0f, mode, s);
    }
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
                             votes_ + static_cast<int64_t>(l) * c.n_head_kv * votes_stride_, votes_stride_, s,
                             votes_max_);
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

}  // namespace x2l
