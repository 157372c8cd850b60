#include "vision/tower_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#include "core/common.h"
#include "cpu/quant.h"
#include "vision/tower_common.h"

namespace x2l {
namespace {

// Softmax that returns exact zeros instead of denormals: exp(d) for d < -80 is below 2e-35, far
// under float resolution next to the max entry's 1, and denormal probabilities make the P V
// products run an order of magnitude slower (microcode assists on x86).
void softmax_ftz(float* x, int64_t n) {
    float mx = x[0];
    for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const float d = x[i] - mx;
        const float e = d < -80.0f ? 0.0f : std::exp(d);
        x[i] = e;
        sum += e;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

struct Segment {
    int64_t begin, len;
};

}  // namespace

void segment_attention(ThreadPool& pool, const float* q, const float* k, const float* v, float* out, int64_t n,
                       int64_t width, int64_t n_head, int64_t head_dim, const std::vector<int64_t>& seg_len,
                       SegmentAttentionScratch& s) {
    const int64_t W = width, H = n_head, hd = head_dim, R = SegmentAttentionScratch::kRows;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    std::vector<Segment> segs;
    int64_t rows = 0, longest = 0, work = 0;
    for (int64_t len : seg_len) {
        if (len <= 0) throw Error("internal: empty attention segment");
        segs.push_back({rows, len});
        rows += len;
        longest = std::max(longest, len);
        work += len * len;
    }
    if (rows != n) throw Error("internal: attention segments do not cover the rows");
    if (n == 0) return;
    s.kt.resize(static_cast<size_t>(n * W));
    s.vt.resize(static_cast<size_t>(n * W));
    s.scores.resize(static_cast<size_t>(pool.n_threads()) * R * longest);
    const bool small = H * work * hd < kMinParallelWork * 4;

    // Transpose: segment g's head h block [hd, len] starts at begin * W + h * hd * len.
    const int64_t n_sh = static_cast<int64_t>(segs.size()) * H;
    auto transpose = [&](int64_t b0, int64_t b1) {
        for (int64_t sh = b0; sh < b1; ++sh) {
            const Segment& g = segs[sh / H];
            const int64_t h = sh % H;
            float* kt = s.kt.data() + g.begin * W + h * hd * g.len;
            float* vt = s.vt.data() + g.begin * W + h * hd * g.len;
            for (int64_t j = 0; j < g.len; ++j) {
                const float* kr = k + (g.begin + j) * W + h * hd;
                const float* vr = v + (g.begin + j) * W + h * hd;
                for (int64_t d = 0; d < hd; ++d) {
                    kt[d * g.len + j] = kr[d];
                    vt[d * g.len + j] = vr[d];
                }
            }
        }
    };
    if (small) {
        transpose(0, n_sh);
    } else {
        pool.parallel_for(n_sh, transpose);
    }

    // Tasks (segment, head, query block), numbered through each (segment, head)'s first task.
    std::vector<int64_t> first_task(n_sh + 1, 0);
    for (int64_t sh = 0; sh < n_sh; ++sh) first_task[sh + 1] = first_task[sh] + (segs[sh / H].len + R - 1) / R;
    const int64_t n_tasks = first_task[n_sh];
    std::atomic<int64_t> next{0};
    auto worker = [&](int ith, int) {
        float* sc = s.scores.data() + static_cast<size_t>(ith) * R * longest;  // [R, longest]
        int64_t sh = 0;
        for (int64_t task = next.fetch_add(1); task < n_tasks; task = next.fetch_add(1)) {
            sh = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
            const Segment& g = segs[sh / H];
            const int64_t h = sh % H, T = g.len;
            const float* kt = s.kt.data() + g.begin * W + h * hd * T;  // [hd, T]
            const float* vt = s.vt.data() + g.begin * W + h * hd * T;
            const int64_t t0 = (task - first_task[sh]) * R, t1 = std::min(T, t0 + R);
            for (int64_t t = t0; t < t1; ++t) {
                const float* qr = q + (g.begin + t) * W + h * hd;
                float* srow = sc + (t - t0) * T;
                std::fill(srow, srow + T, 0.0f);
                int64_t d = 0;
                for (; d + 4 <= hd; d += 4) {  // four key rows per pass: a quarter of the stores
                    const float a0 = qr[d] * scale, a1 = qr[d + 1] * scale, a2 = qr[d + 2] * scale, a3 = qr[d + 3] * scale;
                    const float *k0 = kt + d * T, *k1 = k0 + T, *k2 = k1 + T, *k3 = k2 + T;
                    for (int64_t j = 0; j < T; ++j) srow[j] += a0 * k0[j] + a1 * k1[j] + a2 * k2[j] + a3 * k3[j];
                }
                for (; d < hd; ++d) axpy_f32(qr[d] * scale, kt + d * T, srow, T);
                softmax_ftz(srow, T);
                float* o = out + (g.begin + t) * W + h * hd;  // [hd] slice of [n, W]
                for (int64_t e = 0; e < hd; ++e) o[e] = dot_f32(srow, vt + e * T, T);
            }
        }
    };
    if (small) {
        worker(0, 1);
    } else {
        pool.run(worker);
    }
}

}  // namespace x2l
