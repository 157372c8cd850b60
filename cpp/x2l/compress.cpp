#include "x2l/compress.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/common.h"
#include "cpu/quant.h"

namespace x2l {

std::vector<int32_t> select_entries(const float* importance, int n_layer, int n_head_kv, int64_t w, int64_t m,
                                    int pool_kernel) {
    m = std::min(m, w);
    std::vector<int32_t> keep(static_cast<size_t>(n_layer) * n_head_kv * m);
    std::vector<float> smooth(w);
    std::vector<int32_t> idx(w);
    const int half = std::max(0, pool_kernel / 2);
    for (int l = 0; l < n_layer; ++l) {
        for (int h = 0; h < n_head_kv; ++h) {
            const float* imp = importance + (static_cast<size_t>(l) * n_head_kv + h) * w;
            // Average over a small window: keeping neighbours of salient entries keeps local detail.
            for (int64_t i = 0; i < w; ++i) {
                int64_t a = std::max<int64_t>(0, i - half), b = std::min<int64_t>(w, i + half + 1);
                float s = 0.0f;
                for (int64_t j = a; j < b; ++j) s += imp[j];
                smooth[i] = s / static_cast<float>(b - a);
            }
            std::iota(idx.begin(), idx.end(), 0);
            std::partial_sort(idx.begin(), idx.begin() + m, idx.end(), [&](int32_t a, int32_t b) {
                return smooth[a] > smooth[b] || (smooth[a] == smooth[b] && a < b);
            });
            std::sort(idx.begin(), idx.begin() + m);
            std::copy(idx.begin(), idx.begin() + m, keep.begin() + (static_cast<size_t>(l) * n_head_kv + h) * m);
        }
    }
    return keep;
}

std::vector<float> importance_ranks(const float* importance, int n_layer, int n_head_kv, int64_t w) {
    std::vector<float> out(static_cast<size_t>(n_layer) * n_head_kv * w);
    std::vector<int32_t> idx(w);
    const float scale = w > 1 ? 1.0f / static_cast<float>(w - 1) : 0.0f;
    for (size_t lh = 0; lh < static_cast<size_t>(n_layer) * n_head_kv; ++lh) {
        const float* imp = importance + lh * w;
        std::iota(idx.begin(), idx.end(), 0);
        std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return imp[a] < imp[b]; });
        for (int64_t r = 0; r < w; ++r) out[lh * w + idx[r]] = static_cast<float>(r) * scale;
    }
    return out;
}

PoolScope pool_scope_from_name(const std::string& name) {
    if (name == "head") return PoolScope::Head;
    if (name == "layers") return PoolScope::Layers;
    if (name == "all") return PoolScope::All;
    throw Error("pool_scope must be 'head', 'layers' or 'all' (got '" + name + "')");
}

void pool_importance(std::vector<float>& importance, int n_layer, int n_head_kv, int64_t w, PoolScope scope) {
    if (scope == PoolScope::Head) return;
    if (importance.size() != static_cast<size_t>(n_layer) * n_head_kv * w) throw Error("pool_importance: bad size");
    const std::vector<float> ranks = importance_ranks(importance.data(), n_layer, n_head_kv, w);
    // Per KV head (Layers) or one for all heads (All): the mean rank over the pooled (layer, head) pairs.
    const int groups = scope == PoolScope::Layers ? n_head_kv : 1;
    std::vector<double> mean(static_cast<size_t>(groups) * w);
    for (int l = 0; l < n_layer; ++l) {
        for (int h = 0; h < n_head_kv; ++h) {
            const float* r = ranks.data() + (static_cast<size_t>(l) * n_head_kv + h) * w;
            double* m = mean.data() + static_cast<size_t>(scope == PoolScope::Layers ? h : 0) * w;
            for (int64_t e = 0; e < w; ++e) m[e] += r[e];
        }
    }
    const double count = scope == PoolScope::Layers ? n_layer : static_cast<double>(n_layer) * n_head_kv;
    for (int l = 0; l < n_layer; ++l) {
        for (int h = 0; h < n_head_kv; ++h) {
            const double* m = mean.data() + static_cast<size_t>(scope == PoolScope::Layers ? h : 0) * w;
            float* dst = importance.data() + (static_cast<size_t>(l) * n_head_kv + h) * w;
            for (int64_t e = 0; e < w; ++e) dst[e] = static_cast<float>(m[e] / count);
        }
    }
}

void key_pre_rope(const KVSegment& seg, int layer, int head, int64_t e, int32_t pos, const RopeSpec& rope_spec,
                  float* out) {
    dequantize_row(seg.type(), seg.k_row(layer, head, e), out, seg.head_dim());
    rope(out, 1, seg.head_dim(), rope_spec.rope_dim, -pos, rope_spec.inv_freq, rope_spec.type);
}

std::vector<float> key_distinctiveness(const KVSegment& seg, int64_t n, const RopeSpec& rope_spec) {
    const int L = seg.n_layer(), H = seg.n_head_kv(), hd = seg.head_dim();
    if (n < 1 || n > seg.size()) throw Error("key_distinctiveness: need 1 <= n <= the segment's entries");
    std::vector<float> out(static_cast<size_t>(L) * H * n);
    std::vector<float> keys(static_cast<size_t>(n) * hd);  // [n, head_dim] pre-RoPE
    std::vector<double> mean(hd);
    for (int l = 0; l < L; ++l) {
        for (int h = 0; h < H; ++h) {
            std::fill(mean.begin(), mean.end(), 0.0);
            for (int64_t e = 0; e < n; ++e) {
                float* k = keys.data() + e * hd;
                key_pre_rope(seg, l, h, e, seg.pos(e), rope_spec, k);
                for (int i = 0; i < hd; ++i) mean[i] += k[i];
            }
            double mean_norm = 0.0;
            for (int i = 0; i < hd; ++i) mean_norm += mean[i] * mean[i];
            mean_norm = std::sqrt(mean_norm);
            float* imp = out.data() + (static_cast<size_t>(l) * H + h) * n;
            for (int64_t e = 0; e < n; ++e) {
                const float* k = keys.data() + e * hd;
                double dot = 0.0, norm = 0.0;
                for (int i = 0; i < hd; ++i) {
                    dot += k[i] * mean[i];
                    norm += static_cast<double>(k[i]) * k[i];
                }
                const double denom = std::sqrt(norm) * mean_norm;
                imp[e] = denom > 0.0 ? static_cast<float>(-dot / denom) : 0.0f;
            }
        }
    }
    return out;
}

std::unique_ptr<KVSegment> gather_segment(const KVSegment& src, int64_t src_begin, const std::vector<int32_t>& keep,
                                          int64_t m, DType out_type, const RopeSpec* dense_rope, int32_t dense_base) {
    const int L = src.n_layer(), H = src.n_head_kv(), hd = src.head_dim();
    if (keep.size() != static_cast<size_t>(L) * H * m) throw Error("gather_segment: bad selection size");
    auto out = std::make_unique<KVSegment>(out_type, L, H, hd, m);
    std::vector<int32_t> pos(m);
    for (int64_t i = 0; i < m; ++i) pos[i] = dense_rope ? dense_base + static_cast<int32_t>(i) : src.pos(src_begin + keep[i]);
    out->append(pos.data(), m);
    std::vector<float> tmp(hd);
    const bool same = src.type() == out_type;
    for (int l = 0; l < L; ++l) {
        for (int h = 0; h < H; ++h) {
            const int32_t* k = keep.data() + (static_cast<size_t>(l) * H + h) * m;
            for (int64_t i = 0; i < m; ++i) {
                const int64_t e = src_begin + k[i];
                for (int part = 0; part < 2; ++part) {
                    const uint8_t* row = part == 0 ? src.k_row(l, h, e) : src.v_row(l, h, e);
                    uint8_t* dst = part == 0 ? out->k_row_mut(l, h, i) : out->v_row_mut(l, h, i);
                    const int32_t moved = dense_rope ? pos[i] - src.pos(e) : 0;
                    if (part == 0 && moved != 0) {
                        // R(new) = R(new - old) R(old): one rotation by the distance the row moves.
                        dequantize_row(src.type(), row, tmp.data(), hd);
                        rope(tmp.data(), 1, hd, dense_rope->rope_dim, moved, dense_rope->inv_freq, dense_rope->type);
                        quantize_row(out_type, tmp.data(), dst, hd);
                    } else if (same) {
                        std::copy(row, row + src.row_bytes(), dst);
                    } else {
                        dequantize_row(src.type(), row, tmp.data(), hd);
                        quantize_row(out_type, tmp.data(), dst, hd);
                    }
                }
            }
        }
    }
    return out;
}

void merge_dropped_values(const KVSegment& src, int64_t src_begin, int64_t w, const std::vector<int32_t>& keep,
                          int64_t m, const RopeSpec& rope_spec, float min_similarity, KVSegment& out) {
    const int L = src.n_layer(), H = src.n_head_kv(), hd = src.head_dim();
    if (keep.size() != static_cast<size_t>(L) * H * m || out.size() != m) throw Error("merge_dropped_values: bad sizes");
    if (m >= w) return;  // nothing dropped
    std::vector<float> acc(static_cast<size_t>(m) * hd);  // [m, head_dim] weighted value sums
    std::vector<double> weight(m);
    std::vector<float> v(hd), ke(hd), kn(hd);
    std::vector<int64_t> slot(w);  // entry -> its index among the kept, or -1
    auto cosine = [&](const std::vector<float>& a, const std::vector<float>& b) {
        double dot = 0.0, na = 0.0, nb = 0.0;
        for (int i = 0; i < hd; ++i) {
            dot += static_cast<double>(a[i]) * b[i];
            na += static_cast<double>(a[i]) * a[i];
            nb += static_cast<double>(b[i]) * b[i];
        }
        return na > 0.0 && nb > 0.0 ? dot / std::sqrt(na * nb) : 0.0;
    };
    for (int l = 0; l < L; ++l) {
        for (int h = 0; h < H; ++h) {
            const int32_t* k = keep.data() + (static_cast<size_t>(l) * H + h) * m;
            std::fill(slot.begin(), slot.end(), -1);
            for (int64_t i = 0; i < m; ++i) {
                slot[k[i]] = i;
                dequantize_row(src.type(), src.v_row(l, h, src_begin + k[i]), acc.data() + i * hd, hd);
                weight[i] = 1.0;
            }
            int64_t prev = -1;  // the last kept index (among the kept) before the current entry
            for (int64_t e = 0; e < w; ++e) {
                if (slot[e] >= 0) {
                    prev = slot[e];
                    continue;
                }
                const int64_t next = prev + 1 < m ? prev + 1 : -1;  // the first kept after e
                key_pre_rope(src, l, h, src_begin + e, src.pos(src_begin + e), rope_spec, ke.data());
                int64_t target = -1;
                double best = -2.0;
                for (int64_t cand : {prev, next}) {
                    if (cand < 0) continue;
                    const int64_t ce = src_begin + k[cand];
                    key_pre_rope(src, l, h, ce, src.pos(ce), rope_spec, kn.data());
                    const double c = cosine(ke, kn);
                    if (c > best) best = c, target = cand;
                }
                const double wgt = std::max(0.0, best);
                if (target < 0 || wgt == 0.0 || best < min_similarity) continue;
                dequantize_row(src.type(), src.v_row(l, h, src_begin + e), v.data(), hd);
                float* a = acc.data() + target * hd;
                for (int i = 0; i < hd; ++i) a[i] += static_cast<float>(wgt) * v[i];
                weight[target] += wgt;
            }
            for (int64_t i = 0; i < m; ++i) {
                float* a = acc.data() + i * hd;
                for (int j = 0; j < hd; ++j) a[j] = static_cast<float>(a[j] / weight[i]);
                quantize_row(out.type(), a, out.v_row_mut(l, h, i), hd);
            }
        }
    }
}

}  // namespace x2l
