// Chunk relevance scorers and top-k selection for selective L-KV reloading.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kv_store.h"

namespace x2l {

enum class Scorer { Attention, Keys, Embedding };
Scorer scorer_from_name(const std::string& name);  // throws Error for unknown names

// keys: q_mean [n_layer, n_head * head_dim] mean pre-RoPE query of the question; the query heads of
// each KV-head group are averaged and compared (cosine over all KV heads) with the chunk's mean
// pre-RoPE key, per layer; the chunk score is the mean over layers 1..n_layer-1 (layer 0 mostly
// sees token identity).
std::vector<float> score_keys(const VideoIndex& ix, const std::vector<float>& q_mean, int n_head);

// embedding: question input embeddings q [n_q, n_embd] against each frame's mean input embedding:
// frame score = mean over question tokens of the dot product, chunk score = max over its frames.
std::vector<float> score_embedding(const VideoIndex& ix, const float* q, int64_t n_q);

// attention: mass [n_entries] the question's own tokens put on every entry of the H-only cache
// (sink first, then the chunks' H entries in order), per token, summed over layers and heads;
// base: the same for the template tokens around the question (or empty). A chunk's score is the
// largest per-entry excess mass(e) - base(e) among its entries.
std::vector<float> score_attention(const VideoIndex& ix, const std::vector<float>& mass, const std::vector<float>& base);

struct SelectOptions {
    int top_k = 3;                // chunks to reload (ignored when budget_bytes > 0)
    size_t budget_bytes = 0;      // reload the best chunks whose extra L bytes fit this budget
    bool include_first = false;
    bool include_last = false;
};

// Chosen chunk indices in increasing (temporal) order.
std::vector<int> select_chunks(const VideoIndex& ix, const std::vector<float>& scores, const SelectOptions& o);

}  // namespace x2l
