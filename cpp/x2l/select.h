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

enum class Scorer { Attention, Keys, Embedding, High, HighKeys, MaxSim };
Scorer scorer_from_name(const std::string& name);  // throws Error for unknown names
// True for the scorers that read only the resident tier (sink + H rows, signatures), never the L tier.
bool scorer_is_resident(Scorer s);

// What one scoring read from the index's rows (measured in the key loops, not estimated).
struct ScoreReads {
    size_t low_bytes = 0;        // L rows (host tier)
    size_t high_bytes = 0;       // H rows (resident tier)
    size_t signature_bytes = 0;  // key / embedding signatures
};

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
                              int64_t content_end, int n_head, ThreadPool& pool, ScoreReads* reads = nullptr);

// high: the question's attention over the resident H tier, as the model computes it in the question
// pass: its queries, rotated to their own positions (q_pos0 + t; text positions, which M-RoPE rotates
// as plain RoPE), against every chunk's H keys as stored (post-RoPE), so no entry position is needed
// and the dot products are exactly the model's. Mass per chunk and peak significance as below.
// H entries are the ones the compressor kept because the chunk's own queries attended to them most,
// so a chunk the question needs usually still draws the question's attention through them.
// with_signatures (high_keys): the chunk's key signature (pre-RoPE, against the un-rotated queries)
// joins its H keys in the same softmax: the distinctive keys the compressor may have dropped.
std::vector<float> score_high(const VideoIndex& ix, const float* q_tok, int64_t n_q, int64_t content_begin,
                              int64_t content_end, int n_head, const RopeSpec& rope, int32_t q_pos0,
                              bool with_signatures, ThreadPool& pool, ScoreReads* reads = nullptr);

// The maxsim scorer's signature of one chunk, made from its input rows embd [n, n_embd] (token
// embeddings, or a video's projected frame tokens) before anything is compressed: its distinct rows
// (identical rows, e.g. a repeated token, count once), the n_rows farthest from their mean first,
// returned in input order as f16 [min(n_rows, distinct), n_embd]. Far from the mean is where a chunk
// differs from its usual content (a rare word, a name, a number), which is what a question names.
std::vector<uint16_t> distinct_input_rows(const float* embd, int64_t n, int n_embd, int64_t n_rows);

// maxsim: late interaction (ColBERT's MaxSim, Khattab & Zaharia 2020) between the question's content
// token embeddings q [n_q, n_embd] and every chunk's signature rows (distinct_input_rows): per
// question token t, m_t(c) = the largest cosine between t and a row of chunk c; then
//   score(c) = sum over t of (m_t(c) - median over chunks of m_t)
// so a token every chunk matches (a word the whole input repeats) adds nothing and a word only a few
// chunks hold (the name the question asks about) decides. No model pass, resident rows only.
// Throws Error for an index without row signatures (saved by index format 3 or 4).
std::vector<float> score_maxsim(const VideoIndex& ix, const float* q, int64_t n_q, ThreadPool& pool,
                                ScoreReads* reads = nullptr);

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
                                   int64_t content_end, int n_head, const RopeSpec& rope, ThreadPool& pool,
                                   ScoreReads* reads = nullptr);

// The chunk score of the attention and keys scorers from per-token masses mass [n_tokens, n_chunks]
// (row t: how much of token t's attention each chunk draws; the first n_content rows are the
// question's content, the rest the template after it):
//   (max over content rows - median over all rows) / sqrt(median).
std::vector<float> peak_significance(const double* mass, int64_t n_tokens, int64_t n_content, size_t n_chunks);

// How many of the ranked chunks to reload.
//   TopK  top_k of them (or, with budget_bytes > 0 and no top_k, as many as the budget holds).
//   Gap   stop at the largest drop of the sorted scores s_1 >= s_2 >= ...: k = the smallest i in
//         [1, K) that maximises s_i - s_(i+1), K = min(max_k, n) (k = K when K < 2). Scale-free: a
//         question that singles out one chunk reloads one, one that names several reloads them all.
//   Mass  the smallest k whose chunks hold mass_p of softmax(s / sd(s)) (scores in units of their
//         own spread, so the rule does not depend on the scorer's scale; all equal: K), at most K.
// A byte budget (budget_bytes > 0) then caps either rule: chunks are taken in rank order while their
// extra L bytes fit.
enum class SelectRule { TopK, Gap, Mass };
SelectRule select_rule_from_name(const std::string& name);  // throws Error for unknown names

struct SelectOptions {
    int top_k = 3;                // TopK: chunks to reload (ignored when budget_bytes > 0)
    size_t budget_bytes = 0;      // reload the best chunks whose extra L bytes fit this budget
    bool include_first = false;
    bool include_last = false;
    SelectRule rule = SelectRule::TopK;
    int max_k = 6;                // Gap, Mass: at most this many chunks (>= 1)
    double mass_p = 0.9;          // Mass: the share of the softmax mass to cover, in (0, 1]
};

// The number of ranked chunks a Gap or Mass rule keeps for these scores (before any byte budget).
int shape_cut(const std::vector<float>& scores, const SelectOptions& o);

// Chosen chunk indices in increasing (temporal) order.
std::vector<int> select_chunks(const VideoIndex& ix, const std::vector<float>& scores, const SelectOptions& o);

}  // namespace x2l
