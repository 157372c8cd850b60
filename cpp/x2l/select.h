// Chunk relevance scorers and top-k selection for selective L-KV reloading.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "x2l/kv_store.h"
#include "cpu/ops.h"
#include "core/threadpool.h"

namespace x2l {

enum class Scorer { Attention, Keys, Embedding };
Scorer scorer_from_name(const std::string& name);  // throws Error for unknown names

// The retrieval signature of the keys scorer, kept beside the H tier so that scoring never reads the
// L tier: per layer and KV head, the n_keys keys (pre-RoPE: each rotated back by R(-pos) with its own
// position) farthest from the mean pre-RoPE key, in entry order; fewer when there are fewer entries.
// [n_layer, n_head_kv, n, head_dim]. Distinctive keys are where a chunk differs from its filler: the
// needle, the rare word, the odd frame. seg: the chunk's entries [0, n), before compression where
// the prefill still has them (compression keeps what the chunk's own queries attend to, which is
// not what a later question will look for).
using EntryPos = std::function<int32_t(int layer, int head, int64_t entry)>;
std::vector<float> distinct_pre_rope_keys(const KVSegment& seg, int64_t n, const EntryPos& pos, const RopeSpec& rope,
                                          int n_keys);

// keys: the attention scorer's softmax and peak statistic (below), over every chunk's signature keys
// instead of its L keys: cheap (n_keys entries per chunk) and resident.
std::vector<float> score_keys(const VideoIndex& ix, const float* q_tok, int64_t n_q, int64_t content_begin,
                              int64_t content_end, int n_head, ThreadPool& pool);

// embedding: question input embeddings q [n_q, n_embd] against each frame's mean input embedding:
// frame score = mean over question tokens of the dot product, chunk score = max over its frames.
std::vector<float> score_embedding(const VideoIndex& ix, const float* q, int64_t n_q);

// attention: the question's own pre-RoPE queries q_tok [n_layer, n_q, n_head * head_dim] (from its
// pass over the H-only cache) attend to every chunk's L keys turned back to pre-RoPE: per layer
// (1..n_layer-1), query head and token from content_begin on, a softmax over all L entries. m_t(c) is
// chunk c's mass from token t, averaged over layers and heads; the score is the peak significance
//   (max over content tokens [content_begin, content_end) of m_t(c) - median over all voting tokens)
//   / sqrt(median)
// so a chunk ranks high when one question token singles it out, not when it draws mass from every
// token (the first chunk does, whatever the question). The L tier rather than the H tier, because H
// has often dropped what the question asks for; no RoPE, so that recency and distance do not outvote
// content. The L tier lives in host memory, where this scan runs.
std::vector<float> score_attention(const VideoIndex& ix, const float* q_tok, int64_t n_q, int64_t content_begin,
                                   int64_t content_end, int n_head, const RopeSpec& rope, ThreadPool& pool);

// The chunk score of the attention and keys scorers from per-token masses mass [n_tokens, n_chunks]
// (row t: how much of token t's attention each chunk draws; the first n_content rows are the
// question's content, the rest the template after it):
//   (max over content rows - median over all rows) / sqrt(median).
std::vector<float> peak_significance(const double* mass, int64_t n_tokens, int64_t n_content, size_t n_chunks);

struct SelectOptions {
    int top_k = 3;                // chunks to reload (ignored when budget_bytes > 0)
    size_t budget_bytes = 0;      // reload the best chunks whose extra L bytes fit this budget
    bool include_first = false;
    bool include_last = false;
};

// Chosen chunk indices in increasing (temporal) order.
std::vector<int> select_chunks(const VideoIndex& ix, const std::vector<float>& scores, const SelectOptions& o);

}  // namespace x2l
