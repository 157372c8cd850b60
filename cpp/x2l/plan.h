// The X²L layer's decisions about what each forward attends to, made once, backend-free, and handed to
// the executor (llm/executor.h):
//   - a prefill level: the sink and every earlier chunk's L rows (level 0, which a device streams from
//     host memory) or H rows (level 1), and where the prefix ends when positions are dense;
//   - a question's mixed cache: the selection checked, per chunk its L or H rows and how far its keys
//     move (beacon indexes number entries densely, so a chunk after one that changed tier moves), the
//     position of the question's first token, and how many entries precede it.
#pragma once
#include <cstdint>
#include <vector>

#include "llm/executor.h"
#include "x2l/kv_store.h"

namespace x2l {

struct LevelPlan {
    std::vector<PrefixRows> prefix;  // sink, then per chunk so far its L (level 0) or H (level 1) rows
    int32_t dense_pos = 0;           // entries in the prefix: where a chunk's rows start with dense positions
};
LevelPlan plan_level(const VideoIndex& ix, int level);

struct MixedCachePlan {
    std::vector<int> selected;  // the chunks whose L rows are used: sorted, unique, in range
    MixedCacheLayout layout;
    int64_t entries = 0;        // cache entries before the question: the sink and each chunk's chosen rows
};
// Positions left empty between a dense training-free cache and the question, so the chunks it reloads
// are not packed right against it (docs/x2l.md "Question gap"). Beacon indexes (trained on dense
// numbering) and indexes that keep token positions take no gap.
bool takes_question_gap(const VideoIndex& ix);
// Error for a selection with duplicates or chunks out of range. question_gap: applied where
// takes_question_gap(ix).
MixedCachePlan plan_mixed_cache(const VideoIndex& ix, const std::vector<int>& selected, int32_t question_gap = 0);

// The index's rows as the executor sees them: sink, H rows (compact), L rows (full).
TieredRows tiered_rows(const VideoIndex& ix);

}  // namespace x2l
