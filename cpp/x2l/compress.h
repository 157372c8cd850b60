// Training-free KV compression: keep, per layer and KV head, the m chunk entries with the highest
// importance (neighbour-smoothed). Where the importance comes from is the compressor's rule (x2l.h
// Compressor): attention votes of the chunk's own queries (SnapKV), of a pass that re-reads the chunk
// (KVzip), or how far each key is from the chunk's typical key (KeyDiff, below).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/kv_cache.h"
#include "cpu/ops.h"

namespace x2l {

// importance: [n_layer][n_head_kv][w] attention mass received by each of the chunk's w entries.
// Returns, per (layer, head), the m kept entry indices in increasing (temporal) order:
// [n_layer][n_head_kv][m]. m >= w keeps everything.
std::vector<int32_t> select_entries(const float* importance, int n_layer, int n_head_kv, int64_t w, int64_t m,
                                    int pool_kernel);

// Each (layer, KV head)'s importance [n_layer][n_head_kv][w] as ranks in [0, 1] (the entry of highest
// importance 1, the lowest 0; ties in entry order): scale-free, so rules of different units can be
// summed or averaged.
std::vector<float> importance_ranks(const float* importance, int n_layer, int n_head_kv, int64_t w);

// Where entries are chosen (X2LOptions::pool_scope):
//   Head    each layer and KV head keeps its own entries (the importance as it is);
//   Layers  per KV head, the importance ranks averaged over the layers: every layer keeps the same
//           entries for that head (layer-pooled votes);
//   All     the ranks averaged over every layer and head: the same tokens everywhere (a token is kept
//           or dropped whole, as in token-level eviction).
enum class PoolScope { Head, Layers, All };
PoolScope pool_scope_from_name(const std::string& name);  // Error naming the allowed names
// Replaces importance [n_layer][n_head_kv][w] by the pooled ranks of its scope (Head: unchanged).
void pool_importance(std::vector<float>& importance, int n_layer, int n_head_kv, int64_t w, PoolScope scope);

// Key of entry e of one (layer, KV head) turned back to pre-RoPE: R(-pos) undoes the rotation applied
// at prefill, so keys compare by content, not by position. out: [head_dim]
void key_pre_rope(const KVSegment& seg, int layer, int head, int64_t e, int32_t pos, const RopeSpec& rope, float* out);

// KeyDiff importance (Park et al. 2025, "KeyDiff: key similarity-based KV cache eviction"), on pre-RoPE
// keys: per (layer, KV head), entry e of seg's entries [0, n) scores minus the cosine similarity of
// its key to the mean key of those entries, so the keys least like the chunk's typical key (a rare
// word, a number, the odd frame) rank first. No attention pass: the keys alone decide.
// Returns [n_layer][n_head_kv][n].
std::vector<float> key_distinctiveness(const KVSegment& seg, int64_t n, const RopeSpec& rope);

// Builds a segment of type out_type holding, per (layer, head), rows keep[l][h][0..m) of src
// (entries [src_begin, src_begin + w) of src). Positions are those of head 0's kept entries; with
// dense_rope, kept row i of every layer and head is re-rotated from its own position to dense_base + i
// (before any quantization) and the positions are dense_base + [0, m).
std::unique_ptr<KVSegment> gather_segment(const KVSegment& src, int64_t src_begin, const std::vector<int32_t>& keep,
                                          int64_t m, DType out_type, const RopeSpec* dense_rope = nullptr,
                                          int32_t dense_base = 0);

// KV merging instead of dropping (in the spirit of D2O, Wan et al. 2024, arXiv 2406.13035, and CaM, Zhang
// et al. 2024): every entry of src's [src_begin, src_begin + w) that keep drops gives its value to the
// nearer-in-content of its two kept neighbours in time (the kept entries just before and after it; higher
// cosine similarity of the pre-RoPE keys), weighted by that similarity (clamped at 0); a kept entry's
// value becomes the weighted mean of its own (weight 1) and those it absorbed. Keys are not merged:
// they stay the kept entries' own, at their positions, so RoPE stays exact. A dropped entry whose best
// similarity is below min_similarity is not merged (only near-duplicates blend; a distinct word's value
// would otherwise smear into its neighbour). out: gather_segment's result for keep (its V rows are rewritten).
void merge_dropped_values(const KVSegment& src, int64_t src_begin, int64_t w, const std::vector<int32_t>& keep,
                          int64_t m, const RopeSpec& rope, float min_similarity, KVSegment& out);

}  // namespace x2l
