// Unmasked softmax attention of the vision towers, on the CPU: every row attends to the rows of its own
// segment (a frame for SigLIP / CLIP / InternViT, a window or a whole temporal patch for Qwen's ViT).
#pragma once
#include <cstdint>
#include <vector>

#include "core/threadpool.h"

namespace x2l {

struct SegmentAttentionScratch {
    std::vector<float> kt, vt;    // [n, W]: per (segment, head) a [head_dim, seg_len] block of K, V transposed
    std::vector<float> scores;    // [n_threads, kRows, longest segment]
    static constexpr int64_t kRows = 16;  // query rows per task
};

// q, k, v, out: [n, width] rows, head h in columns [h * head_dim, (h + 1) * head_dim); seg_len: the
// segments' lengths in row order, summing to n. out = softmax(q k^T / sqrt(head_dim)) v per segment and head.
// K and V are transposed per (segment, head) first so both products run over contiguous rows of the
// segment's length (head_dim is only 64-80, too short for efficient per-key dots), and tasks are
// (segment, head, block of query rows), so a task's K and V stay in cache.
void segment_attention(ThreadPool& pool, const float* q, const float* k, const float* v, float* out, int64_t n,
                       int64_t width, int64_t n_head, int64_t head_dim, const std::vector<int64_t>& seg_len,
                       SegmentAttentionScratch& scratch);

}  // namespace x2l
