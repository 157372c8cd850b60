// KV cache built from segments. A segment is a run of cache entries with one storage type
// (F32, F16, Q8_0 or Q4_0), a position per entry, and per layer/KV-head rows of head_dim values.
// The decode cache is a list of segments in temporal order: borrowed, read-only segments (for
// X²L: the sink, per-chunk H-KVs and reloaded L-KVs, owned by the video index) followed by the
// cache's own growing tail, where new tokens are appended. Attention walks the list and reads
// each segment in its own format, so quantized H-KVs are never expanded into a working copy.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/ops.h"
#include "cpu/quant.h"

namespace x2l {

class KVSegment {
  public:
    KVSegment(DType type, int n_layer, int n_head_kv, int head_dim, int64_t capacity);
    // A read-only view of rows stored elsewhere (e.g. a memory-mapped saved index); k and v hold
    // [n_layer][n_head_kv][n] rows each, positions n entries. The memory must outlive the view.
    static std::unique_ptr<KVSegment> view(DType type, int n_layer, int n_head_kv, int head_dim, int64_t n,
                                           const uint8_t* k, const uint8_t* v, const int32_t* pos);

    DType type() const { return type_; }
    int n_layer() const { return n_layer_; }
    int n_head_kv() const { return n_head_kv_; }
    int head_dim() const { return head_dim_; }
    int64_t size() const { return n_; }
    int64_t capacity() const { return cap_; }
    size_t row_bytes() const { return row_bytes_; }
    size_t nbytes() const { return 2 * layer_bytes() * n_layer_ + static_cast<size_t>(cap_) * sizeof(int32_t); }
    size_t layer_bytes() const { return row_bytes_ * n_head_kv_ * static_cast<size_t>(cap_); }  // K (or V) of one layer
    bool is_view() const { return view_; }
    const uint8_t* k_data() const { return k_; }
    const uint8_t* v_data() const { return v_; }
    const int32_t* pos_data() const { return pos_; }
    size_t used_bytes() const;  // bytes of the entries in use

    // Row of entry i for (layer, kv head). Layout: [layer][head][entry] rows of row_bytes.
    const uint8_t* k_row(int layer, int head, int64_t i) const { return k_ + offset(layer, head, i); }
    const uint8_t* v_row(int layer, int head, int64_t i) const { return v_ + offset(layer, head, i); }
    uint8_t* k_row_mut(int layer, int head, int64_t i) { return k_ + offset(layer, head, i); }
    uint8_t* v_row_mut(int layer, int head, int64_t i) { return v_ + offset(layer, head, i); }
    int32_t pos(int64_t i) const { return pos_[i]; }

    // Reserves entries [n, n + count) and returns the first index; positions are set now.
    int64_t append(const int32_t* positions, int64_t count);
    // Stores float K and V rows ([n_head_kv, head_dim] each) of entry i for one layer, converting to type().
    void store(int layer, int64_t i, const float* k, const float* v);
    void truncate(int64_t n);  // drop entries >= n
    // Makes this segment hold the same entries as src (same geometry and type; capacity >= src size):
    // positions and size now, rows of one layer per call, so a reload can proceed layer by layer.
    void assign_meta(const KVSegment& src);
    void copy_layer(const KVSegment& src, int layer);
    void shift_positions(int32_t delta);  // after a re-rotation of the keys by delta positions
    // Re-rotates entry i's keys (every layer and head) from its position to new_pos (RoPE is a
    // rotation per frequency pair, so R(new) = R(new - old) R(old)) and records new_pos.
    void move_entry(int64_t i, int32_t new_pos, const RopeSpec& rope);

  private:
    size_t offset(int layer, int head, int64_t i) const {
        return ((static_cast<size_t>(layer) * n_head_kv_ + head) * cap_ + static_cast<size_t>(i)) * row_bytes_;
    }
    DType type_;
    int n_layer_, n_head_kv_, head_dim_;
    int64_t cap_, n_ = 0;
    size_t row_bytes_;
    aligned_vector<uint8_t> storage_;  // owned rows, K then V, each 64-byte aligned (empty for views)
    std::vector<int32_t> pos_storage_;
    uint8_t* k_ = nullptr;
    uint8_t* v_ = nullptr;
    int32_t* pos_ = nullptr;
    bool view_ = false;
};

class KVCache {
  public:
    KVCache(DType type, int n_layer, int n_head_kv, int head_dim, int64_t n_ctx);

    // Borrowed segments placed before the tail, in temporal order. The caller keeps them alive.
    void set_prefix(std::vector<const KVSegment*> prefix);
    const std::vector<const KVSegment*>& prefix() const { return prefix_; }
    KVSegment& tail() { return *tail_; }
    const KVSegment& tail() const { return *tail_; }

    int64_t n_prefix() const { return n_prefix_; }
    int64_t size() const { return n_prefix_ + tail_->size(); }
    int64_t capacity() const { return n_prefix_ + tail_->capacity(); }
    void clear() { tail_->truncate(0); }
    void truncate(int64_t n_total);  // keep the first n_total entries (must be >= n_prefix)
    size_t tail_bytes() const { return tail_->nbytes(); }

  private:
    std::vector<const KVSegment*> prefix_;
    int64_t n_prefix_ = 0;
    std::unique_ptr<KVSegment> tail_;
};

}  // namespace x2l
