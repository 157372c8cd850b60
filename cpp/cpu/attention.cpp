#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/common.h"
#include "cpu/quant.h"

namespace x2l {

namespace {

constexpr int kTileTokens = 16;  // query tokens per tiled-attention task

// Scores of one query head against a segment's keys, for entries [0, count).
void score_segment(const KVSegment& s, int layer, int kvh, int64_t count, const float* q, const uint8_t* q8,
                          float scale, float* out) {
    const int hd = s.head_dim();
    switch (s.type()) {
        case DType::F32:
            for (int64_t i = 0; i < count; ++i) out[i] = dot_f32(reinterpret_cast<const float*>(s.k_row(layer, kvh, i)), q, hd) * scale;
            break;
        case DType::F16:
            for (int64_t i = 0; i < count; ++i) out[i] = dot_f16_f32(reinterpret_cast<const uint16_t*>(s.k_row(layer, kvh, i)), q, hd) * scale;
            break;
        default:  // quantized keys: integer dot against the Q8_0 query, dequantized in the kernel
            for (int64_t i = 0; i < count; ++i) out[i] = vec_dot(s.type(), hd, s.k_row(layer, kvh, i), q8) * scale;
            break;
    }
}

void accumulate_segment(const KVSegment& s, int layer, int kvh, int64_t count, const float* p, float* out,
                               float* tmp) {
    const int hd = s.head_dim();
    for (int64_t i = 0; i < count; ++i) {
        if (p[i] == 0.0f) continue;
        const uint8_t* row = s.v_row(layer, kvh, i);
        switch (s.type()) {
            case DType::F32: axpy_f32(p[i], reinterpret_cast<const float*>(row), out, hd); break;
            case DType::F16: axpy_f16(p[i], reinterpret_cast<const uint16_t*>(row), out, hd); break;
            default:
                dequantize_row(s.type(), row, tmp, hd);
                axpy_f32(p[i], tmp, out, hd);
                break;
        }
    }
}

// One softmax row per (token, head), for head sizes without a tiled kernel.
void attention_rows(ThreadPool& pool, AttentionScratch& ws, const AttentionShape& c, int layer, const float* q_all,
                    float* out_all, int64_t t_begin, int64_t t_end, int64_t first, const KVCache& cache,
                    const AttentionObserver* hooks) {
    const int hd = c.head_dim;
    const int group = c.n_head / c.n_head_kv;
    const int64_t QD = static_cast<int64_t>(c.n_head) * hd;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const size_t score_stride = static_cast<size_t>(cache.capacity() + 1);
    const size_t q8_stride = ws.qbuf.size() / pool.n_threads();
    const auto& prefix = cache.prefix();
    const KVSegment& tail = cache.tail();
    bool need_q8 = tail.type() == DType::Q8_0 || tail.type() == DType::Q4_0;
    for (const KVSegment* s : prefix) need_q8 |= s->type() == DType::Q8_0 || s->type() == DType::Q4_0;

    const int64_t n_tasks = (t_end - t_begin) * c.n_head;
    // Attention observation (X²L importance and scorer statistics): per-thread partial sums.
    const bool observe = hooks && hooks->out && hooks->end > hooks->begin;
    const int64_t obs_n = observe ? hooks->end - hooks->begin : 0;
    const size_t part = static_cast<size_t>(c.n_head_kv) * obs_n;  // one accumulator per thread
    if (observe) ws.obs_part.assign(static_cast<size_t>(pool.n_threads()) * part, 0.0f);
    pool.run([&](int ith, int nth) {
        float* scores = ws.scores.data() + ith * score_stride;
        uint8_t* q8 = ws.qbuf.data() + ith * q8_stride;
        float* tmp = ws.vtmp.data() + static_cast<size_t>(ith) * hd;
        for (int64_t task = ith; task < n_tasks; task += nth) {
            const int64_t t = t_begin + task / c.n_head;
            const int h = static_cast<int>(task % c.n_head);
            const int kvh = h / group;
            const float* q = q_all + t * QD + static_cast<int64_t>(h) * hd;
            if (need_q8) quantize_row(DType::Q8_0, q, q8, hd);
            // Scores over the prefix segments, then the tail up to this token (causal).
            int64_t off = 0;
            for (const KVSegment* s : prefix) {
                score_segment(*s, layer, kvh, s->size(), q, q8, scale, scores + off);
                off += s->size();
            }
            const int64_t n_tail = first + t + 1;
            score_segment(tail, layer, kvh, n_tail, q, q8, scale, scores + off);
            const int64_t n_vis = off + n_tail;
            softmax(scores, n_vis);
            if (observe && t >= hooks->from && t < hooks->to) {
                float* acc = ws.obs_part.data() + static_cast<size_t>(ith) * part + static_cast<size_t>(kvh) * obs_n;
                const int64_t e1 = std::min(hooks->end, n_vis);
                for (int64_t e = hooks->begin; e < e1; ++e) acc[e - hooks->begin] += scores[e];
            }
            float* out = out_all + t * QD + static_cast<int64_t>(h) * hd;
            std::memset(out, 0, sizeof(float) * hd);
            off = 0;
            for (const KVSegment* s : prefix) {
                accumulate_segment(*s, layer, kvh, s->size(), scores + off, out, tmp);
                off += s->size();
            }
            accumulate_segment(tail, layer, kvh, n_tail, scores + off, out, tmp);
        }
    });
    if (observe) {
        float* dst = hooks->out;
        for (int th = 0; th < pool.n_threads(); ++th) {
            const float* src = ws.obs_part.data() + static_cast<size_t>(th) * part;
            for (size_t i = 0; i < part; ++i) dst[i] += src[i];
        }
    }
}

// 16 floats as one GCC/Clang vector: AVX-512 registers where the build has them, pairs of AVX2 or
// quads of NEON/SSE registers otherwise; the compiler picks the instructions.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }
inline float hmax16(f32x16 v) {
    float m = v[0];
    for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
    return m;
}
inline float hsum16(f32x16 v) {
    float s = 0.0f;
    for (int i = 0; i < 16; ++i) s += v[i];
    return s;
}
inline f32x16 vmax(f32x16 a, f32x16 b) { return a > b ? a : b; }

// exp_neg (ops.h) on 16 lanes: the same exp_remainder, floor done by truncate-and-correct.
inline f32x16 exp_neg16(f32x16 x) {
    x = vmax(x, f32x16{} - 87.0f);
    const f32x16 t = x * 1.44269504089f + 0.5f;
    const i32x16 n0 = __builtin_convertvector(t, i32x16);          // truncation toward zero
    const i32x16 n = n0 + (__builtin_convertvector(n0, f32x16) > t);  // true is -1: floor for t < 0
    const f32x16 p = exp_remainder(x, __builtin_convertvector(n, f32x16));
    const i32x16 bits = (n + 127) << 23;
    f32x16 scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

constexpr int kTileKeys = 64;  // one K/V tile: 4 vectors of scores per query row

// One query row against one K/V tile with online softmax. q: [hd] (pre-scaled), kt: [hd, kTileKeys]
// (transposed tile), vt: [kTileKeys, hd], nv: visible entries of the tile (a prefix, causal).
// m, l: the row's running max and sum; o: [hd] its unnormalised output. NV = hd / 16.
template <int NV>
inline void tile_scores(const float* q, const float* kt, f32x16 s[4]) {
    for (int b = 0; b < 4; ++b) s[b] = f32x16{};
    for (int d = 0; d < NV * 16; ++d) {
        const float qd = q[d];
        const float* kr = kt + d * kTileKeys;
        for (int b = 0; b < 4; ++b) s[b] += qd * load16(kr + 16 * b);
    }
}

template <int NV>
void tile_row(const float* q, const float* kt, const float* vt, int nv, float& m, float& l, float* o) {
    f32x16 s[4];
    tile_scores<NV>(q, kt, s);
    const f32x16 ninf = f32x16{} - INFINITY;
    f32x16 mx = ninf;
    for (int b = 0; b < 4; ++b) {
        f32x16 idx;
        for (int i = 0; i < 16; ++i) idx[i] = static_cast<float>(16 * b + i);
        s[b] = idx < static_cast<float>(nv) ? s[b] : ninf;
        mx = vmax(mx, s[b]);
    }
    const float m_new = std::max(m, hmax16(mx));
    const float corr = m == -INFINITY ? 0.0f : exp_neg(m - m_new);
    f32x16 sum = {};
    for (int b = 0; b < 4; ++b) {
        f32x16 idx;
        for (int i = 0; i < 16; ++i) idx[i] = static_cast<float>(16 * b + i);
        s[b] = idx < static_cast<float>(nv) ? exp_neg16(s[b] - m_new) : f32x16{};
        sum += s[b];
    }
    m = m_new;
    l = l * corr + hsum16(sum);
    f32x16 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = load16(o + 16 * v) * corr;
    float p[kTileKeys];
    std::memcpy(p, s, sizeof(p));
    for (int j = 0; j < nv; ++j) {
        const float* vr = vt + static_cast<size_t>(j) * NV * 16;
        for (int v = 0; v < NV; ++v) acc[v] += p[j] * load16(vr + 16 * v);
    }
    for (int v = 0; v < NV; ++v) store16(o + 16 * v, acc[v]);
}

// The final probabilities exp(s - m) / l of one row over the first nv entries of a tile: p [kTileKeys].
template <int NV>
void tile_probs(const float* q, const float* kt, int nv, float m, float inv_l, float* p) {
    f32x16 s[4];
    tile_scores<NV>(q, kt, s);
    for (int b = 0; b < 4; ++b) store16(p + 16 * b, exp_neg16(s[b] - m) * inv_l);
    for (int j = nv; j < kTileKeys; ++j) p[j] = 0.0f;
}

struct TileFns {
    void (*row)(const float*, const float*, const float*, int, float&, float&, float*);
    void (*probs)(const float*, const float*, int, float, float, float*);
};

TileFns tile_fns_for(int head_dim) {
    switch (head_dim) {
        case 16: return {tile_row<1>, tile_probs<1>};
        case 32: return {tile_row<2>, tile_probs<2>};
        case 64: return {tile_row<4>, tile_probs<4>};
        case 128: return {tile_row<8>, tile_probs<8>};
        case 256: return {tile_row<16>, tile_probs<16>};
        default: return {nullptr, nullptr};
    }
}

// Adds the final attention probabilities of the observed rows of one task (token block tb, KV head kvh)
// over the observed entries to acc [obs entries] (this KV head's slice of a per-thread accumulator).
void observe_rows(int hd, int layer, int kvh, int64_t tb, int rows, int group, int64_t first, const float* qs, float* kt,
                  const float* m, const float* l, const TileFns& fns, const std::vector<const KVSegment*>& prefix,
                  const KVSegment& tail, const AttentionObserver& hooks, int64_t n_vis, float* acc_all, int64_t obs_n) {
    constexpr int BK = kTileKeys;
    float* acc = acc_all + static_cast<size_t>(kvh) * obs_n;
    auto observe_segment = [&](const KVSegment& seg, int64_t g, int64_t a, int64_t b, bool causal) {
        for (int64_t j0 = a; j0 < b; j0 += BK) {
            const int nb = static_cast<int>(std::min<int64_t>(BK, b - j0));
            for (int j = 0; j < nb; ++j) {
                float krow[256];
                dequantize_row(seg.type(), seg.k_row(layer, kvh, j0 + j), krow, hd);
                for (int d = 0; d < hd; ++d) kt[d * BK + j] = krow[d];
            }
            for (int r = 0; r < rows; ++r) {
                const int64_t t = tb + r / group;
                if (t < hooks.from || t >= hooks.to) continue;
                int nv = nb;
                if (causal) nv = static_cast<int>(std::clamp<int64_t>(first + t + 1 - j0, 0, nb));
                if (nv == 0) continue;
                float p[BK];
                fns.probs(qs + static_cast<size_t>(r) * hd, kt, nv, m[r], 1.0f / l[r], p);
                float* dst = acc + (g + j0 - hooks.begin);
                for (int j = 0; j < nv; ++j) dst[j] += p[j];
            }
        }
    };
    int64_t g = 0;
    for (const KVSegment* seg : prefix) {
        const int64_t a = std::max(hooks.begin, g), b = std::min({hooks.end, g + seg->size(), n_vis});
        if (a < b) observe_segment(*seg, g, a - g, b - g, false);
        g += seg->size();
    }
    const int64_t a = std::max(hooks.begin, g), b = std::min(hooks.end, n_vis);
    if (a < b) observe_segment(tail, g, a - g, b - g, true);
}

// Flash-style attention for batches: one task is a block of kTileTokens tokens times the query heads
// of one KV head (GQA rows share their keys). Keys and values are dequantized to f32 once per tile of
// kTileKeys entries, K transposed so that a row's scores are vector FMAs over the tile, and each row
// keeps a running max and sum (online softmax), so no [n_ctx] score row is materialised.
void attention_tiled(ThreadPool& pool, AttentionScratch& ws, const AttentionShape& c, int layer, const float* q_all,
                     float* out_all, int64_t t_begin, int64_t t_end, int64_t first, const KVCache& cache,
                     const AttentionObserver* hooks) {
    constexpr int BK = kTileKeys, BT = kTileTokens;
    const int hd = c.head_dim, group = c.n_head / c.n_head_kv, H = c.n_head_kv;
    const TileFns fns = tile_fns_for(hd);
    const int rows_max = BT * group;
    const int64_t QD = static_cast<int64_t>(c.n_head) * hd;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const auto& prefix = cache.prefix();
    const KVSegment& tail = cache.tail();
    // Per thread: Kt [hd, BK], V [BK, hd], Q [rows, hd], O [rows, hd], m [rows], l [rows]
    const size_t stride = static_cast<size_t>(2 * hd * BK + rows_max * (2 * hd + 2));
    if (ws.tiles.size() < stride * pool.n_threads()) ws.tiles.assign(stride * pool.n_threads(), 0.0f);
    int64_t n_prefix = 0;
    for (const KVSegment* seg : prefix) n_prefix += seg->size();
    const int64_t n_blocks = (t_end - t_begin + BT - 1) / BT;
    const int64_t base_tasks = n_blocks * H;
    // Few (block, KV head) tasks, as in decode: split the entries too (flash-decoding) so that every
    // thread has work, then merge the partial softmaxes. Splits are tile-aligned.
    const int nth_all = pool.n_threads();
    const int64_t most_entries = n_prefix + first + t_end;
    // Observation (X²L importance): the final probabilities of the observed queries over entries
    // [obs_begin, obs_end), summed per KV head; recomputed per tile once each row's max and sum are known.
    const bool observe = hooks && hooks->out && hooks->end > hooks->begin;
    const int64_t obs_n = observe ? hooks->end - hooks->begin : 0;
    const size_t obs_part = static_cast<size_t>(H) * obs_n;
    if (observe) ws.obs_part.assign(static_cast<size_t>(nth_all) * obs_part, 0.0f);
    int64_t n_split = 1;
    if (base_tasks < 2 * nth_all && !observe) {
        n_split = std::clamp<int64_t>((2 * nth_all + base_tasks - 1) / base_tasks, 1, std::max<int64_t>(1, most_entries / (4 * BK)));
    }
    const int64_t n_tasks = base_tasks * n_split;
    const size_t part_stride = static_cast<size_t>(rows_max) * (hd + 2);  // o [rows, hd], m [rows], l [rows]
    if (n_split > 1 && ws.attn_part.size() < n_tasks * part_stride) ws.attn_part.resize(n_tasks * part_stride);
    pool.run([&](int ith, int nth) {
        float* kt = ws.tiles.data() + stride * ith;
        float* vt = kt + hd * BK;
        float* qs = vt + BK * hd;
        for (int64_t task = ith; task < n_tasks; task += nth) {
            const int64_t split = task / base_tasks, base = task % base_tasks;
            const int kvh = static_cast<int>(base % H);
            const int64_t tb = t_begin + (base / H) * BT, te = std::min(t_end, tb + BT);
            const int rows = static_cast<int>(te - tb) * group;
            // This task's entries [e0, e1) of the concatenation prefix + tail (tail up to its last token).
            const int64_t n_vis = n_prefix + first + te;
            const int64_t span = (n_vis + n_split - 1) / n_split;
            const int64_t e0 = std::min(n_vis, split * ((span + BK - 1) / BK) * BK);
            const int64_t e1 = n_split == 1 ? n_vis : std::min(n_vis, e0 + ((span + BK - 1) / BK) * BK);
            float* o = n_split > 1 ? ws.attn_part.data() + task * part_stride : qs + static_cast<size_t>(rows_max) * hd;
            float* m = o + static_cast<size_t>(rows_max) * hd;
            float* l = m + rows_max;
            // row r: token tb + r / group, query head kvh * group + r % group
            auto head_offset = [&](int r) {
                return (tb + r / group) * QD + static_cast<int64_t>(kvh * group + r % group) * hd;
            };
            for (int r = 0; r < rows; ++r) {
                const float* q = q_all + head_offset(r);
                for (int d = 0; d < hd; ++d) qs[static_cast<size_t>(r) * hd + d] = q[d] * scale;
            }
            std::fill(o, o + static_cast<size_t>(rows) * hd, 0.0f);
            std::fill(m, m + rows, -INFINITY);
            std::fill(l, l + rows, 0.0f);
            // Entries [a, b) of one segment. The prefix is visible to every row; tail entry e is
            // visible to the token t with first + t >= e.
            auto run_segment = [&](const KVSegment& seg, int64_t a, int64_t b, bool causal) {
                for (int64_t j0 = a; j0 < b; j0 += BK) {
                    const int nb = static_cast<int>(std::min<int64_t>(BK, b - j0));
                    for (int j = 0; j < nb; ++j) {
                        float krow[256];  // head_dim <= 256 (tile_row_for)
                        dequantize_row(seg.type(), seg.k_row(layer, kvh, j0 + j), krow, hd);
                        for (int d = 0; d < hd; ++d) kt[d * BK + j] = krow[d];
                        dequantize_row(seg.type(), seg.v_row(layer, kvh, j0 + j), vt + static_cast<size_t>(j) * hd, hd);
                    }
                    for (int r = 0; r < rows; ++r) {
                        int nv = nb;
                        if (causal) nv = static_cast<int>(std::clamp<int64_t>(first + tb + r / group + 1 - j0, 0, nb));
                        if (nv == 0) continue;
                        fns.row(qs + static_cast<size_t>(r) * hd, kt, vt, nv, m[r], l[r], o + static_cast<size_t>(r) * hd);
                    }
                }
            };
            int64_t g = 0;  // first entry of the segment in the concatenation
            for (const KVSegment* seg : prefix) {
                const int64_t a = std::max(e0, g), b = std::min(e1, g + seg->size());
                if (a < b) run_segment(*seg, a - g, b - g, false);
                g += seg->size();
            }
            if (std::max(e0, g) < e1) run_segment(tail, std::max(e0, g) - g, e1 - g, true);
            if (observe) observe_rows(hd, layer, kvh, tb, rows, group, first, qs, kt, m, l, fns, prefix, tail, *hooks,
                                      n_vis, ws.obs_part.data() + static_cast<size_t>(ith) * obs_part, obs_n);
            if (n_split > 1) continue;  // merged below
            for (int r = 0; r < rows; ++r) {
                const float inv = 1.0f / l[r];
                const float* orow = o + static_cast<size_t>(r) * hd;
                float* out = out_all + head_offset(r);
                for (int d = 0; d < hd; ++d) out[d] = orow[d] * inv;
            }
        }
    });
    if (observe) {
        float* dst = hooks->out;
        for (int th = 0; th < nth_all; ++th) {  // a fixed order: sums do not depend on scheduling
            const float* src = ws.obs_part.data() + static_cast<size_t>(th) * obs_part;
            for (size_t i = 0; i < obs_part; ++i) dst[i] += src[i];
        }
    }
    if (n_split == 1) return;
    // Merge the splits of every (block, KV head): rescale each partial to the common max.
    for (int64_t base = 0; base < base_tasks; ++base) {
        const int kvh = static_cast<int>(base % H);
        const int64_t tb = t_begin + (base / H) * BT, te = std::min(t_end, tb + BT);
        const int rows = static_cast<int>(te - tb) * group;
        for (int r = 0; r < rows; ++r) {
            float mx = -INFINITY;
            for (int64_t sp = 0; sp < n_split; ++sp) {
                const float* part = ws.attn_part.data() + (sp * base_tasks + base) * part_stride;
                mx = std::max(mx, part[static_cast<size_t>(rows_max) * hd + r]);
            }
            float* out = out_all + (tb + r / group) * QD + static_cast<int64_t>(kvh * group + r % group) * hd;
            std::fill(out, out + hd, 0.0f);
            float sum = 0.0f;
            for (int64_t sp = 0; sp < n_split; ++sp) {
                const float* part = ws.attn_part.data() + (sp * base_tasks + base) * part_stride;
                const float pm = part[static_cast<size_t>(rows_max) * hd + r];
                if (pm == -INFINITY) continue;  // nothing of this split was visible to the row
                const float w = exp_neg(pm - mx);
                sum += w * part[static_cast<size_t>(rows_max) * (hd + 1) + r];
                const float* po = part + static_cast<size_t>(r) * hd;
                for (int d = 0; d < hd; ++d) out[d] += w * po[d];
            }
            const float inv = 1.0f / sum;
            for (int d = 0; d < hd; ++d) out[d] *= inv;
        }
    }
}

// head_dim 16, 32, 64, 128 or 256
bool tiled_attention_supported(int head_dim) { return tile_fns_for(head_dim).row != nullptr; }

}  // namespace

size_t AttentionScratch::bytes() const {  // the votes' obs_part is the caller's, not the forward's
    return (scores.capacity() + vtmp.capacity() + tiles.capacity() + attn_part.capacity()) * sizeof(float) +
           qbuf.capacity();
}

void attention(ThreadPool& pool, AttentionScratch& s, const AttentionShape& shape, int layer, const float* q,
               float* out, int64_t n, int64_t first, const KVCache& cache, const AttentionObserver* observer) {
    const int nth = pool.n_threads();
    s.scores.resize(static_cast<size_t>(nth) * (cache.capacity() + 1));
    s.qbuf.resize(static_cast<size_t>(nth) * row_bytes(DType::Q8_0, ((shape.head_dim + 31) / 32) * 32));
    s.vtmp.resize(static_cast<size_t>(nth) * shape.head_dim);
    if (tiled_attention_supported(shape.head_dim)) {
        attention_tiled(pool, s, shape, layer, q, out, 0, n, first, cache, observer);
    } else {
        attention_rows(pool, s, shape, layer, q, out, 0, n, first, cache, observer);
    }
}

}  // namespace x2l
