#include "cpu/kv_cache.h"

#include <cstring>

#include "core/common.h"

namespace x2l {

static bool kv_type_ok(DType t) {
    return t == DType::F32 || t == DType::F16 || t == DType::Q8_0 || t == DType::Q4_0;
}

KVSegment::KVSegment(DType type, int n_layer, int n_head_kv, int head_dim, int64_t capacity)
    : type_(type), n_layer_(n_layer), n_head_kv_(n_head_kv), head_dim_(head_dim), cap_(capacity) {
    if (!kv_type_ok(type)) throw Error(std::string("unsupported KV cache type ") + type_info(type).name);
    if (head_dim % type_info(type).block_size != 0) {
        throw Error(std::string("head_dim ") + std::to_string(head_dim) + " is not a multiple of the " +
                    type_info(type).name + " block size");
    }
    if (capacity < 0) throw Error("negative KV capacity");
    row_bytes_ = x2l::row_bytes(type, head_dim);
    size_t bytes = row_bytes_ * static_cast<size_t>(n_layer) * n_head_kv * static_cast<size_t>(capacity);
    // K and V each start on a 64-byte boundary (aligned_vector, and V after K rounded up): the
    // attention kernels stream rows with 64-byte vector loads, and a malloc'd block's offset within a
    // cache line otherwise follows the heap's history (X²L prefill at 8k: 25 s or 29 s on the same code).
    const size_t k_bytes = (bytes + 63) / 64 * 64;
    storage_.resize(k_bytes + bytes);
    pos_storage_.resize(static_cast<size_t>(capacity));
    k_ = storage_.data();
    v_ = k_ + k_bytes;
    pos_ = pos_storage_.data();
}

std::unique_ptr<KVSegment> KVSegment::view(DType type, int n_layer, int n_head_kv, int head_dim, int64_t n,
                                           const uint8_t* k, const uint8_t* v, const int32_t* pos) {
    std::unique_ptr<KVSegment> s(new KVSegment(type, n_layer, n_head_kv, head_dim, 0));
    s->cap_ = n;
    s->n_ = n;
    // Views are never written: store()/append() check view_ before touching these.
    s->k_ = const_cast<uint8_t*>(k);
    s->v_ = const_cast<uint8_t*>(v);
    s->pos_ = const_cast<int32_t*>(pos);
    s->view_ = true;
    return s;
}

void KVSegment::assign_meta(const KVSegment& src) {
    if (view_) throw Error("cannot write into a read-only KV view");
    if (src.type_ != type_ || src.n_layer_ != n_layer_ || src.n_head_kv_ != n_head_kv_ || src.head_dim_ != head_dim_) {
        throw Error("KV segment geometry or type mismatch");
    }
    if (src.n_ > cap_) throw BudgetError("KV working buffer too small for the reloaded chunk");
    std::memcpy(pos_, src.pos_, static_cast<size_t>(src.n_) * sizeof(int32_t));
    n_ = src.n_;
}

void KVSegment::shift_positions(int32_t delta) {
    if (view_) throw Error("cannot write into a read-only KV view");
    for (int64_t i = 0; i < n_; ++i) pos_[i] += delta;
}

void KVSegment::move_entry(int64_t i, int32_t new_pos, const RopeSpec& spec) {
    if (view_) throw Error("cannot write into a read-only KV view");
    const int32_t delta = new_pos - pos_[i];
    if (delta == 0) return;
    std::vector<float> row(head_dim_);
    for (int l = 0; l < n_layer_; ++l) {
        for (int h = 0; h < n_head_kv_; ++h) {
            uint8_t* k = k_ + offset(l, h, i);
            dequantize_row(type_, k, row.data(), head_dim_);
            rope(row.data(), 1, head_dim_, spec.rope_dim, delta, spec.inv_freq, spec.type);
            quantize_row(type_, row.data(), k, head_dim_);
        }
    }
    pos_[i] = new_pos;
}

void KVSegment::copy_layer(const KVSegment& src, int layer) {
    const size_t bytes = row_bytes_ * static_cast<size_t>(src.n_);
    for (int h = 0; h < n_head_kv_; ++h) {
        std::memcpy(k_ + offset(layer, h, 0), src.k_row(layer, h, 0), bytes);
        std::memcpy(v_ + offset(layer, h, 0), src.v_row(layer, h, 0), bytes);
    }
}

size_t KVSegment::used_bytes() const {  // rows in use, both K and V, plus positions
    return 2 * row_bytes_ * static_cast<size_t>(n_layer_) * n_head_kv_ * static_cast<size_t>(n_) +
           static_cast<size_t>(n_) * sizeof(int32_t);
}

int64_t KVSegment::append(const int32_t* positions, int64_t count) {
    if (view_) throw Error("cannot append to a read-only KV view");
    if (n_ + count > cap_) {
        throw BudgetError("KV cache is full: " + std::to_string(n_) + " + " + std::to_string(count) +
                          " entries exceed the context size " + std::to_string(cap_));
    }
    int64_t first = n_;
    std::memcpy(pos_ + n_, positions, static_cast<size_t>(count) * sizeof(int32_t));
    n_ += count;
    return first;
}

void KVSegment::store(int layer, int64_t i, const float* k, const float* v) {
    for (int h = 0; h < n_head_kv_; ++h) {
        size_t off = offset(layer, h, i);
        quantize_row(type_, k + static_cast<int64_t>(h) * head_dim_, k_ + off, head_dim_);
        quantize_row(type_, v + static_cast<int64_t>(h) * head_dim_, v_ + off, head_dim_);
    }
}

void KVSegment::truncate(int64_t n) {
    if (n < 0 || n > n_) throw Error("invalid KV truncation");
    n_ = n;
}

KVCache::KVCache(DType type, int n_layer, int n_head_kv, int head_dim, int64_t n_ctx)
    : tail_(new KVSegment(type, n_layer, n_head_kv, head_dim, n_ctx)) {}

void KVCache::set_prefix(std::vector<const KVSegment*> prefix) {
    int64_t n = 0;
    for (const KVSegment* s : prefix) {
        if (s->n_layer() != tail_->n_layer() || s->n_head_kv() != tail_->n_head_kv() ||
            s->head_dim() != tail_->head_dim()) {
            throw Error("KV segment geometry does not match the model");
        }
        n += s->size();
    }
    prefix_ = std::move(prefix);
    n_prefix_ = n;
}

void KVCache::truncate(int64_t n_total) {
    if (n_total < n_prefix_) throw Error("cannot truncate into the borrowed prefix");
    tail_->truncate(n_total - n_prefix_);
}

}  // namespace x2l
