// CPU attention over a KV cache of typed segments (cpu/kv_cache.h): each query row attends to every
// prefix entry and, causally, to the tail entries up to its own; quantized K/V are dequantized in the
// kernel. Optionally sums the softmax probabilities the queries give to a range of entries (the X²L
// prefill's votes).
#pragma once
#include <cstdint>

#include "core/threadpool.h"
#include "cpu/kv_cache.h"
#include "cpu/ops.h"

namespace x2l {

struct AttentionShape {
    int n_head = 0, n_head_kv = 0, head_dim = 0;
};

// For batch queries t in [from, to), the softmax probabilities over cache entries [begin, end) are
// summed (max: their maximum taken) over the query heads of each KV head into out[kv_head][entry - begin]
// (one layer's slice; out accumulates across calls the same way).
struct AttentionObserver {
    float* out = nullptr;
    int64_t from = 0, to = INT64_MAX;
    int64_t begin = 0, end = 0;
    bool max = false;
};

// Scratch for attention(); grows on demand and is reused across calls.
struct AttentionScratch {
    aligned_vector<float> scores;     // [n_threads, n_ctx + 1]
    aligned_vector<uint8_t> qbuf;     // [n_threads, q8 rows] for quantized K
    aligned_vector<float> vtmp;       // [n_threads, head_dim]
    aligned_vector<float> tiles;      // [n_threads, tiled-attention scratch]
    aligned_vector<float> attn_part;  // [tasks, rows, head_dim + 2] split softmax partials
    aligned_vector<float> obs_part;   // [n_threads, n_head_kv, observed entries]
    size_t bytes() const;
};

// q: [n, n_head * head_dim] (RoPE applied), out: [n, n_head * head_dim]. Batch token t is cache tail
// entry first + t; it sees the prefix and tail entries [0, first + t].
void attention(ThreadPool& pool, AttentionScratch& scratch, const AttentionShape& shape, int layer, const float* q,
               float* out, int64_t n, int64_t first, const KVCache& cache, const AttentionObserver* observer = nullptr);

}  // namespace x2l
