// Training-free KV compression: keep, per layer and KV head, the chunk entries that the chunk's
// own last queries attend to most (SnapKV-style observation window with neighbour smoothing).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/kv_cache.h"

namespace x2l {

// importance: [n_layer][n_head_kv][w] attention mass received by each of the chunk's w entries.
// Returns, per (layer, head), the m kept entry indices in increasing (temporal) order:
// [n_layer][n_head_kv][m]. m >= w keeps everything.
std::vector<int32_t> select_entries(const float* importance, int n_layer, int n_head_kv, int64_t w, int64_t m,
                                    int pool_kernel);

// Builds a segment of type out_type holding, per (layer, head), rows keep[l][h][0..m) of src
// (entries [src_begin, src_begin + w) of src). Positions are those of head 0's kept entries.
std::unique_ptr<KVSegment> gather_segment(const KVSegment& src, int64_t src_begin, const std::vector<int32_t>& keep,
                                          int64_t m, DType out_type);

}  // namespace x2l
