// Video-X²L over the LLM: chunked bi-level prefill into a VideoIndex, then per question: chunk
// scoring, top-k selection, asynchronous L-KV reload and decoding on the mixed cache
// sink + [L-KV(c) if c selected else H-KV(c)] in temporal order.
//
// Compression here is the training-free rule (compress.h): the chunk is run in full on top of its
// memory, then each layer/KV head keeps the entries the chunk's queries attended to most, with the
// positions they had (keys are stored post-RoPE, so any mix of L and H chunks is consistent).
//
// Backend-free: what each forward attends to is planned here (plan.h) and run by the session's
// executor (llm/executor.h), on whichever backend the session has.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/common.h"
#include "llm/executor.h"
#include "llm/session.h"
#include "x2l/kv_store.h"
#include "x2l/plan.h"
#include "x2l/select.h"

namespace x2l {

// Keys scorer: signature keys kept per chunk, layer and KV head (select.h distinct_pre_rope_keys).
// 8 gave the planted chunk first 7/7 and the single needle in the top 3 9/12 on SmolLM2; the mean
// key alone (1) gave 2/7 and 4/12.
constexpr int kKeySignatureEntries = 8;
// maxsim scorer: one signature row per this many chunk tokens (select.h distinct_input_rows). Chosen
// on tuning data only (bench/README.md "maxsim"): SmolLM2 needles of the tune split (256-token chunks,
// idx 140-188, needle chunk in the top 3: one row per 4 tokens 49/49 single and 49/49 multi-key, per 8
// 49/49 and 48/49, per 16 worse) and tiny-VLM needle videos of a seed stream no evaluation uses (seed
// 555, 120 and 300 s: per 4 the card's chunk first 24/24, per 8 21/24).
constexpr int kRowSignatureStride = 4;

struct X2LOptions {
    int ratio_low = 2;
    int ratio_high = 32;
    DType low_type = DType::F16;    // host tier
    DType high_type = DType::Q8_0;  // device tier
    DType work_type = DType::F16;   // the chunk's full KV while it is being compressed (X2LPrefill
                                    // uses the session's kv_type)
    bool pin_ends = false;          // first/last chunk at ratio_low in the H pass too (official code)
    bool two_pass = true;           // official semantics; false = one pass, L and H cut from it
    int obs_window = 0;             // snapkv: queries at the chunk's end that vote; 0 = all (per-entry mean)
    int pool_kernel = 5;            // neighbour smoothing of the importance
    size_t max_host_bytes = 0;      // budget for the L tier (0 = unlimited)
    size_t max_device_bytes = 0;    // budget for sink + H tier + working buffers (0 = unlimited)
    // Device prefill on a discrete GPU: bytes of L-KVs it may keep in device memory instead of streaming
    // them for every later chunk (-1: half the device memory free when the prefill starts; 0: stream all).
    int64_t prefill_low_cache_bytes = -1;
    int64_t max_chunk_tokens = 0;   // 0: grows with the largest chunk seen
    // Training-free (any model), per layer and KV head the entries of highest importance (compress.h):
    //   "snapkv"  the mean attention each entry gets from the chunk's own queries (SnapKV's votes with
    //             every query of the chunk as the observation window, or its last obs_window).
    //   "kvzip"   the most attention each entry gets while the model re-reads the chunk: the chunk, then
    //             repeat_prompt, then the chunk again in one pass; the prompt's and the copy's queries
    //             vote, with the maximum over queries and heads (KVzip's context reconstruction). Costs
    //             the chunk twice per level.
    //   "keydiff" key distinctiveness (compress.h key_distinctiveness): no votes, the chunk's keys alone.
    //   "hybrid"  snapkv's votes and keydiff's distinctiveness from the same pass, each as ranks within
    //             its layer and KV head (compress.h importance_ranks), summed: an entry ranks high when
    //             the chunk attends to it or when its key is unlike the chunk's typical key.
    // "beacon": Video-XL's learned summarization tokens (needs VST weights): one VST after every
    // `ratio` raw tokens, VST rows through their own q/k/v projections, only the VSTs' K/V kept, dense
    // positions.
    std::string compressor = "snapkv";
    // The H tier's training-free rule when it differs from the L tier's ("" = compressor): each level's
    // pass scores the chunk with its own rule (two passes only).
    std::string high_compressor;
    std::vector<int32_t> repeat_prompt;  // kvzip: the tokens between the chunk and its copy (may be empty)
    bool max_votes = false;  // snapkv: each entry's largest vote (over the voting queries and the KV head's
                             // query heads) instead of its mean
    // Training-free compressors: which entries share one choice (compress.h PoolScope): "head" (each layer
    // and KV head its own), "layers" (per KV head, the same entries in every layer), "all" (the same tokens
    // in every layer and head).
    std::string pool_scope = "head";
    // Training-free compressors: each dropped entry's value merged into its more similar kept neighbour
    // (compress.h merge_dropped_values) instead of discarded; both tiers.
    bool merge = false;
    // merge: only dropped entries whose pre-RoPE key has at least this cosine with the chosen kept
    // neighbour's are merged (near-duplicates); the rest are dropped. 0 merges every positive match.
    float merge_min_similarity = 0.0f;
    // Training-free compressors: number every tier's entries densely, as the official code does
    // (X2L_SPEC.md "Position handling"): each level's pass runs a chunk right after the entries it
    // attends to, and its kept rows are re-rotated to consecutive positions, so a mixed cache moves
    // whole chunks (plan.h) and the question follows the last entry instead of the last token.
    // 1-D RoPE only (M-RoPE keeps its 3-D positions); beacon is always dense.
    bool dense_positions = false;
};

struct PrefillStats {
    int64_t input_tokens = 0;      // tokens of the input (sink + chunks)
    int64_t forward_tokens = 0;    // token-forwards spent (both passes)
    int64_t device_forward_tokens = 0;  // of which on a device
    double seconds = 0.0;
    // Device prefill only: the most device memory it held, and the L-prefix bytes it
    // streamed host -> device (0 on integrated GPUs, which read the L tier in place, and for L rows
    // cached in device memory).
    size_t device_peak_bytes = 0;
    size_t streamed_bytes = 0;
    size_t cached_low_bytes = 0;  // L rows it kept in device memory instead (the most at a time)
    size_t fetched_bytes = 0;     // new K/V rows copied device -> host (beacon: the VST rows alone)
};

class X2LPrefill {
  public:
    LlmSession& session() const { return s_; }  // whose mutex() callers hold around each call
    X2LPrefill(LlmSession& s, const X2LOptions& o);
    void add_sink(const std::vector<int32_t>& tokens);
    // A chunk as token ids (text) or input embeddings [n, n_embd] (video features). n_frames splits
    // the chunk into equal parts for the embedding signature.
    void add_chunk_tokens(const std::vector<int32_t>& tokens, int n_frames, bool is_last);
    // pos: M-RoPE models' explicit positions of the chunk's rows [3, n] (media; nullptr: consecutive
    // positions on every axis); each entry records its first-axis position.
    void add_chunk_embd(const float* embd, int64_t n, int n_frames, bool is_last, const int32_t* pos = nullptr);
    // M-RoPE media: the position the question's text takes after the input (LlmSession::eval_media's rule).
    void set_text_position(int32_t pos);
    // Hands the index over; the device prefill's buffers and page-locked L rows are released here.
    std::unique_ptr<VideoIndex> finish();
    // The chunks added so far as an index of their own, while the prefill goes on (a live source asked
    // before it ends). The sink's and chunks' rows are shared, not copied: a chunk's tiers never change
    // once it is added, and they live as long as the prefill, its finished index or any snapshot.
    std::unique_ptr<VideoIndex> snapshot() const;
    const PrefillStats& stats() const { return stats_; }
    size_t working_bytes() const { return cache_ ? cache_->tail().nbytes() : 0; }
    // True while (and, after finish(), if to the end) the forward passes run on the session's device
    // (either compressor; the selection and the tiers are made on the host either way).
    bool on_device() const { return on_device_; }
    // Why a session with a device prefills on the CPU ("" otherwise), e.g. the device ran out of memory.
    const std::string& device_note() const { return device_note_; }

  private:
    void ensure_cache(int64_t n);
    // Runs a level (rows, what they attend to, the votes or beacon rows wanted) through the runner,
    // leaving the new rows in cache_'s tail; summed votes become per-entry means (max votes stay as they are).
    void run_level(PrefillLevel level);
    void note_device_stats();
    void add_chunk_beacon(ChunkKV& ch, const float* embd, int64_t n, bool pinned);
    void add_chunk_training_free(ChunkKV& ch, const float* embd, int64_t n, bool pinned, const int32_t* pos);
    // Runs the chunk [n, n_embd] on top of prefix and leaves its full KV in tail rows [0, n); importance
    // gets the compressor's per-entry importance [n_layer][n_head_kv][n].
    // level: 0 = L (on the earlier L rows), 1 = H (on the earlier H rows).
    // pos: the rows' positions [n_pos_axes, n] (M-RoPE) or null for consecutive positions from next_pos.
    void chunk_importance(const float* embd, int64_t n, const int32_t* pos, int level, std::vector<float>& importance);
    void check_budget() const;

    LlmSession& s_;
    X2LOptions o_;
    std::unique_ptr<VideoIndex> ix_;
    std::unique_ptr<KVCache> cache_;
    PrefillStats stats_;
    int64_t n_input_ = 0;
    bool done_last_ = false;
    std::unique_ptr<PrefillRunner> runner_;  // the forward passes, on the session's backend
    bool on_device_ = false;
    std::string device_note_;
};

// The last scores() call: what it read from the index and where its time went.
struct ScoreStats {
    ScoreReads reads;           // index rows the chunk scan read (the question pass reads sink + H rows)
    double pass_seconds = 0.0;  // the question's pass over the H-only cache (not for embedding)
    double scan_seconds = 0.0;  // scoring the chunks from the pass's queries
};

// Answers questions on one index; a question's tokens and answer go in its own tail.
class X2LDecoder {
  public:
    LlmSession& session() const { return s_; }  // whose mutex() callers hold around each call
    // question_gap: positions between a dense training-free cache and the question (plan.h
    // takes_question_gap; other indexes ignore it), in [0, kMaxQuestionGap].
    X2LDecoder(LlmSession& s, const VideoIndex& ix, int64_t max_tail_tokens, int32_t question_gap = 0);
    static constexpr int32_t kMaxQuestionGap = 1 << 20;

    // Relevance of each chunk to the question. tokens: the question as the model will see it (with
    // its template); only tokens [content_begin, content_end) vote, so the template's own tokens
    // (identical for every question) do not drown the content. content_end <= 0 counts from the end.
    std::vector<float> scores(const std::vector<int32_t>& question, Scorer scorer, int64_t content_begin = 0,
                              int64_t content_end = 0);
    const ScoreStats& score_stats() const { return score_stats_; }
    // Builds the mixed cache for this selection and starts the asynchronous reload.
    void prepare(const std::vector<int>& selected);
    const std::vector<int>& selected() const { return plan_.selected; }

    // Same contract as LlmSession: append tokens after the mixed cache, logits of the last one.
    void eval(const std::vector<int32_t>& tokens, std::vector<float>* all_out = nullptr);
    const std::vector<float>& last_logits() const { return last_logits_; }
    int32_t sample(Sampler& sampler);
    const std::vector<int32_t>& history() const { return history_; }
    int64_t n_past() const { return static_cast<int64_t>(history_.size()); }
    int64_t n_ctx() const { return max_tail_; }
    int32_t question_position() const { return plan_.layout.tail_pos; }  // where the question's first token sits
    void truncate(int64_t n);
    int64_t cache_entries() const { return plan_.entries; }  // entries before the tail
    // The mixed cache's segments before the tail, as host rows: sink, then one per chunk (on the CPU its
    // working copy of the L-KVs when selected, else its H-KVs; rows of reloaded chunks are complete after
    // wait_reload(); on a device the H-only cache).
    const std::vector<const KVSegment*>& prefix_segments() const { return cache_->host_prefix(); }
    void wait_reload() { cache_->wait_reload(); }
    size_t resident_bytes() const { return cache_->resident_bytes(); }  // sink + H + reloaded working buffers + tail
    const ReloadStats& reload_stats() const { return cache_->reload_stats(); }
    size_t working_bytes() const { return cache_->working_bytes(); }
    // True when the mixed cache lives on the session's device (sink and H in device memory, L pinned on
    // the host and copied per question; with dense positions the keys of chunks that moved are re-rotated
    // there), and eval() and the scorers' question pass run there. The scores themselves are computed on
    // the CPU, and prefix_segments() then describes the H-only cache.
    bool on_device() const { return cache_->on_device(); }
    // Why a session with a device decodes this index on the CPU ("" otherwise).
    const std::string& device_note() const { return device_note_; }
    GraphStats graph_stats() const { return cache_->graph_stats(); }  // zeros on the CPU

  private:
    LlmSession& s_;
    const VideoIndex& ix_;
    int64_t max_tail_;
    int32_t question_gap_;
    MixedCachePlan compact_only_;  // the H-only cache (no chunk selected)
    MixedCachePlan plan_;          // the current selection's (selected: sorted chunk indices)
    std::unique_ptr<MixedCache> cache_;
    std::vector<float> last_logits_;
    std::vector<int32_t> history_;
    std::string device_note_;
    ScoreStats score_stats_;
};

}  // namespace x2l
