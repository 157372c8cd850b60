#include "x2l/plan.h"

#include <algorithm>
#include <string>

#include "core/common.h"

namespace x2l {

LevelPlan plan_level(const VideoIndex& ix, int level) {
    LevelPlan p;
    p.prefix.push_back({ix.sink.get(), false});  // the sink stays resident, whatever the level
    p.dense_pos = static_cast<int32_t>(ix.sink->size());
    for (const ChunkKV& ch : ix.chunks) {
        const KVSegment* rows = level == 0 ? ch.low.get() : ch.high.get();
        p.prefix.push_back({rows, level == 0});
        p.dense_pos += static_cast<int32_t>(rows->size());
    }
    return p;
}

bool takes_question_gap(const VideoIndex& ix) { return ix.dense_positions && ix.compressor != "beacon"; }

MixedCachePlan plan_mixed_cache(const VideoIndex& ix, const std::vector<int>& selected, int32_t question_gap) {
    const int n = static_cast<int>(ix.chunks.size());
    MixedCachePlan plan;
    plan.selected = selected;
    std::vector<int>& sel = plan.selected;
    std::sort(sel.begin(), sel.end());
    if (std::adjacent_find(sel.begin(), sel.end()) != sel.end()) throw Error("selection has duplicate chunks");
    for (int c : sel) {
        if (c < 0 || c >= n) throw Error("chunk index " + std::to_string(c) + " out of range [0, " + std::to_string(n) + ")");
    }
    MixedCacheLayout& L = plan.layout;
    L.full.assign(static_cast<size_t>(n), 0);
    L.delta.assign(static_cast<size_t>(n), 0);
    for (int c : sel) L.full[c] = 1;
    int32_t next = static_cast<int32_t>(ix.sink->size());
    for (int c = 0; c < n; ++c) {
        const KVSegment& rows = L.full[c] ? *ix.chunks[c].low : *ix.chunks[c].high;
        if (ix.dense_positions && rows.size() > 0) L.delta[c] = next - rows.pos(0);
        next += static_cast<int32_t>(rows.size());
    }
    L.tail_pos = ix.dense_positions ? next + (takes_question_gap(ix) ? question_gap : 0)
                 : ix.text_pos >= 0  ? ix.text_pos
                                     : ix.next_pos;
    plan.entries = next;
    return plan;
}

TieredRows tiered_rows(const VideoIndex& ix) {
    TieredRows r;
    r.sink = ix.sink.get();
    for (const ChunkKV& ch : ix.chunks) {
        r.compact.push_back(ch.high.get());
        r.full.push_back(ch.low.get());
    }
    return r;
}

}  // namespace x2l
