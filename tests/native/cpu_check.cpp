// CPU kernel checks that run on any ISA the kernels are built for (x86 native / portable, aarch64
// under qemu): tests/test_cross_isa.py compiles this file with cpp/core and cpp/cpu for each target.
//
//   1. GEMM, every weight format x token counts x row counts: gemm() == gemm_reference() bit for bit
//      where the build has a tiled kernel; matmul() on 2 threads == one-thread gemm / vec_dot rows.
//   2. Attention (cpu/attention.h): prefill, decode (key splits), prefix segments of other types,
//      head sizes on and off the tiled path, the X²L vote observer: against a double-precision
//      softmax reference written here.
//   3. The vector exp of cpu/simd.h against std::exp.
// Every result is also written to argv[1] (tag, float count, floats) so that the test can compare
// targets: GEMM results are defined bit for bit (gemm.h) and must agree exactly across ISAs; the
// attention's float summation order follows the vector width, so it agrees within tolerance.
// Inputs come from a fixed integer generator, identical on every target.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/threadpool.h"
#include "cpu/attention.h"
#include "cpu/features.h"
#include "cpu/gemm.h"
#include "cpu/kv_cache.h"
#include "cpu/ops.h"
#include "cpu/quant.h"
#include "cpu/simd.h"

using namespace x2l;

namespace {

int fails = 0;
#define CHECK(c, ...)                                       \
    do {                                                    \
        if (!(c)) {                                         \
            if (++fails < 30) {                             \
                std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
                std::printf(__VA_ARGS__);                   \
                std::printf("\n");                          \
            }                                               \
        }                                                   \
    } while (0)

// splitmix64: the same stream on every platform (std:: distributions are implementation-defined).
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    float uniform() { return static_cast<float>(next() >> 40) / static_cast<float>(1u << 24) * 2.0f - 1.0f; }
    float normalish() { return (uniform() + uniform() + uniform()) * 0.577f; }
};

FILE* dump = nullptr;
void emit(const std::string& tag, const float* v, size_t n) {
    if (!dump) return;
    const uint32_t len = static_cast<uint32_t>(tag.size()), cnt = static_cast<uint32_t>(n);
    std::fwrite(&len, 4, 1, dump);
    std::fwrite(tag.data(), 1, len, dump);
    std::fwrite(&cnt, 4, 1, dump);
    std::fwrite(v, 4, n, dump);
}

// Random weight rows of type t: random bytes with sane scales (what the kernels read is all bits).
std::vector<uint8_t> random_weights(Rng& rng, DType t, int64_t rows, int64_t n) {
    const TypeInfo& ti = type_info(t);
    const size_t rb = row_bytes(t, n);
    std::vector<uint8_t> w(rb * rows);
    for (auto& b : w) b = static_cast<uint8_t>(rng.next());
    for (int64_t r = 0; r < rows; ++r) {
        uint8_t* row = w.data() + r * rb;
        if (t == DType::F32) {
            for (int64_t i = 0; i < n; ++i) {
                const float f = rng.normalish();
                std::memcpy(row + 4 * i, &f, 4);
            }
            continue;
        }
        if (t == DType::F16 || t == DType::BF16) {
            for (int64_t i = 0; i < n; ++i) {
                const uint16_t h = t == DType::F16 ? fp32_to_fp16(rng.normalish()) : fp32_to_bf16(rng.normalish());
                std::memcpy(row + 2 * i, &h, 2);
            }
            continue;
        }
        for (int64_t b = 0; b < n / ti.block_size; ++b) {
            uint8_t* p = row + b * ti.block_bytes;
            const uint16_t d = fp32_to_fp16(0.01f * (1.0f + rng.uniform())), m = fp32_to_fp16(0.01f * rng.uniform());
            if (t == DType::Q6_K) {
                std::memcpy(p + 208, &d, 2);
            } else {
                std::memcpy(p, &d, 2);
                if (t == DType::Q4_1 || t == DType::Q5_1 || t == DType::Q4_K) std::memcpy(p + 2, &m, 2);
            }
        }
    }
    return w;
}

void check_gemm() {
    const DType types[] = {DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q5_0,
                           DType::Q5_1, DType::Q8_0, DType::Q4_K, DType::Q6_K};
    ThreadPool pool2(2);
    int n_cases = 0;
    for (DType t : types) {
        const bool kquant = type_info(t).block_size == 256;
        const int64_t n_ins[] = {kquant ? 256 : 96, kquant ? 768 : 576};
        for (int64_t n_in : n_ins) {
            for (int64_t n_out : {7, 40}) {
                for (int64_t T : {1, 2, 3, 5, 17}) {
                    Rng rng(1000 * static_cast<uint64_t>(t) + 10 * n_out + T + n_in);
                    const std::vector<uint8_t> w = random_weights(rng, t, n_out, n_in);
                    const size_t rb = row_bytes(t, n_in);
                    std::vector<float> x(T * n_in);
                    for (auto& v : x) v = rng.normalish();
                    const DType at = dot_type(t);
                    // activations in the gemm layout
                    std::vector<uint8_t> rows(at == DType::F32 ? 0 : row_bytes(at, n_in) * T);
                    std::vector<uint8_t> buf(gemm_acts_bytes(at, T, n_in));
                    GemmActs acts = gemm_acts(at, x.data(), T, n_in, buf.data());
                    if (at != DType::F32) {
                        for (int64_t i = 0; i < T; ++i) {
                            quantize_row(at, x.data() + i * n_in, rows.data() + i * row_bytes(at, n_in), n_in);
                            gemm_pack_token(acts, i, rows.data() + i * row_bytes(at, n_in));
                        }
                    }
                    std::vector<float> ref(T * n_out), got(T * n_out), mt(T * n_out);
                    const char* name = type_info(t).name;
                    if (gemm_supported(t)) {
                        gemm_reference(t, w.data(), rb, 0, n_out, acts, ref.data(), n_out, nullptr);
                        gemm(t, w.data(), rb, 0, n_out, acts, got.data(), n_out, nullptr);
                        for (size_t i = 0; i < ref.size(); ++i)
                            CHECK(std::memcmp(&ref[i], &got[i], 4) == 0, "gemm %s n_in %lld rows %lld T %lld [%zu]: %.9g != ref %.9g",
                                  name, (long long)n_in, (long long)n_out, (long long)T, i, got[i], ref[i]);
                    } else {
                        for (int64_t i = 0; i < T; ++i) {
                            const uint8_t* a = at == DType::F32 ? reinterpret_cast<const uint8_t*>(x.data() + i * n_in)
                                                                : rows.data() + i * row_bytes(at, n_in);
                            vec_dot_rows(t, n_in, w.data(), rb, n_out, a, got.data() + i * n_out);
                        }
                    }
                    // The threaded matmul splits rows between threads and batches tokens: no
                    // output may depend on that.
                    Weight wt;
                    wt.type = t;
                    wt.n_in = n_in;
                    wt.n_out = n_out;
                    wt.data = w.data();
                    wt.row_bytes = rb;
                    aligned_vector<uint8_t> scratch;
                    matmul(pool2, wt, x.data(), T, mt.data(), scratch);
                    for (size_t i = 0; i < got.size(); ++i)
                        CHECK(std::memcmp(&mt[i], &got[i], 4) == 0, "matmul %s T %lld [%zu]: %.9g != %.9g", name,
                              (long long)T, i, mt[i], got[i]);
                    // against a dequantized double product: the kernels compute the right thing
                    std::vector<float> wf(n_in), xf(n_in);
                    for (int64_t i = 0; i < T; ++i) {
                        if (at == DType::F32) std::copy_n(x.data() + i * n_in, n_in, xf.data());
                        else dequantize_row(at, rows.data() + i * row_bytes(at, n_in), xf.data(), n_in);
                        for (int64_t r = 0; r < n_out; ++r) {
                            dequantize_row(t, w.data() + r * rb, wf.data(), n_in);
                            double s = 0, mag = 0;
                            for (int64_t k = 0; k < n_in; ++k) {
                                s += static_cast<double>(wf[k]) * xf[k];
                                mag += std::fabs(static_cast<double>(wf[k]) * xf[k]);
                            }
                            if (at == DType::Q8_1) {
                                // The min term uses Q8_1's stored s = fp16(d * sum q), not the exact sum.
                                const uint8_t* wr = w.data() + r * rb;
                                const uint8_t* ar = rows.data() + i * row_bytes(at, n_in);
                                for (int64_t b = 0; b < n_in / 32; ++b) {
                                    uint16_t mh, sh;
                                    std::memcpy(&mh, wr + b * type_info(t).block_bytes + 2, 2);
                                    std::memcpy(&sh, ar + b * 36 + 2, 2);
                                    double xs = 0;
                                    for (int k = 0; k < 32; ++k) xs += xf[32 * b + k];
                                    s += static_cast<double>(fp16_to_fp32(mh)) * (fp16_to_fp32(sh) - xs);
                                }
                            }
                            const double e = std::fabs(got[i * n_out + r] - s);
                            CHECK(e <= 2e-5 * mag + 1e-30, "%s T %lld row %lld: %.9g vs double %.9g", name, (long long)T,
                                  (long long)r, got[i * n_out + r], s);
                        }
                    }
                    emit(std::string("gemm/") + name + "/" + std::to_string(n_in) + "x" + std::to_string(n_out) + "/T" +
                             std::to_string(T) + (gemm_supported(t) ? "" : "/vecdot"),
                         got.data(), got.size());
                    ++n_cases;
                }
            }
        }
    }
    std::printf("gemm: %d cases\n", n_cases);
}

// ---- attention
struct AttnCase {
    const char* name;
    int n_head, n_head_kv, hd;
    std::vector<DType> prefix_types;  // one segment each
    std::vector<int64_t> prefix_sizes;
    DType tail_type;
    int64_t n_old, n_new;  // tail entries already cached, tokens in the call
    bool observe;
};

void check_attention(const AttnCase& c) {
    uint64_t seed = 1469598103934665603ull;  // FNV-1a of the name: the same inputs on every target
    for (const char* p = c.name; *p; ++p) seed = (seed ^ static_cast<uint8_t>(*p)) * 1099511628211ull;
    Rng rng(seed);
    const int L = 2, layer = 1, H = c.n_head_kv, hd = c.hd, group = c.n_head / H;
    const int64_t QD = static_cast<int64_t>(c.n_head) * hd, KD = static_cast<int64_t>(H) * hd;
    // Keys with a spread of magnitudes so that softmax is not uniform.
    auto fill = [&](std::vector<float>& v, float scale) {
        for (auto& x : v) x = rng.normalish() * scale;
    };
    std::vector<std::unique_ptr<KVSegment>> prefix;
    std::vector<const KVSegment*> prefix_ptrs;
    // reference copies of every visible entry's K and V as the kernel reads them (dequantized)
    std::vector<std::vector<float>> ref_k(H), ref_v(H);
    auto record = [&](const KVSegment& s, int64_t i) {
        std::vector<float> tmp(hd);
        for (int h = 0; h < H; ++h) {
            dequantize_row(s.type(), s.k_row(layer, h, i), tmp.data(), hd);
            ref_k[h].insert(ref_k[h].end(), tmp.begin(), tmp.end());
            dequantize_row(s.type(), s.v_row(layer, h, i), tmp.data(), hd);
            ref_v[h].insert(ref_v[h].end(), tmp.begin(), tmp.end());
        }
    };
    int32_t pos = 0;
    for (size_t si = 0; si < c.prefix_types.size(); ++si) {
        auto s = std::make_unique<KVSegment>(c.prefix_types[si], L, H, hd, c.prefix_sizes[si]);
        for (int64_t i = 0; i < c.prefix_sizes[si]; ++i) {
            const int64_t e = s->append(&pos, 1);
            ++pos;
            for (int l = 0; l < L; ++l) {
                std::vector<float> k(KD), v(KD);
                fill(k, 2.0f);
                fill(v, 1.0f);
                s->store(l, e, k.data(), v.data());
            }
            record(*s, e);
        }
        prefix_ptrs.push_back(s.get());
        prefix.push_back(std::move(s));
    }
    KVCache cache(c.tail_type, L, H, hd, c.n_old + c.n_new + 8);
    cache.set_prefix(prefix_ptrs);
    KVSegment& tail = cache.tail();
    for (int64_t i = 0; i < c.n_old + c.n_new; ++i) {
        const int64_t e = tail.append(&pos, 1);
        ++pos;
        for (int l = 0; l < L; ++l) {
            std::vector<float> k(KD), v(KD);
            fill(k, 2.0f);
            fill(v, 1.0f);
            tail.store(l, e, k.data(), v.data());
        }
        record(tail, e);
    }
    const int64_t n_prefix = cache.n_prefix();
    std::vector<float> q(c.n_new * QD), out(c.n_new * QD, NAN);
    fill(q, 1.0f);
    // Observer over a window straddling prefix and tail, for the tokens of the second half.
    const int64_t obs_begin = n_prefix / 2, obs_end = n_prefix + c.n_old + c.n_new / 2 + 1;
    std::vector<float> votes(static_cast<size_t>(H) * (obs_end - obs_begin), 0.0f);
    AttentionObserver obs;
    if (c.observe) {
        obs.out = votes.data();
        obs.from = c.n_new / 2;
        obs.to = c.n_new;
        obs.begin = obs_begin;
        obs.end = obs_end;
    }
    ThreadPool pool(2);
    AttentionScratch scratch;
    attention(pool, scratch, {c.n_head, H, hd}, layer, q.data(), out.data(), c.n_new, c.n_old, cache,
              c.observe ? &obs : nullptr);
    // double-precision reference
    std::vector<double> ref_votes(votes.size(), 0.0);
    double max_err = 0.0, max_vote_err = 0.0;
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    for (int64_t t = 0; t < c.n_new; ++t) {
        const int64_t n_vis = n_prefix + c.n_old + t + 1;
        for (int h = 0; h < c.n_head; ++h) {
            const int kvh = h / group;
            const float* qh = q.data() + t * QD + static_cast<int64_t>(h) * hd;
            std::vector<double> s(n_vis);
            double mx = -1e300;
            for (int64_t j = 0; j < n_vis; ++j) {
                double d = 0;
                for (int i = 0; i < hd; ++i) d += static_cast<double>(qh[i]) * ref_k[kvh][j * hd + i];
                s[j] = d * scale;
                mx = std::max(mx, s[j]);
            }
            double sum = 0;
            for (auto& x : s) sum += (x = std::exp(x - mx));
            for (int i = 0; i < hd; ++i) {
                double o = 0;
                for (int64_t j = 0; j < n_vis; ++j) o += s[j] * ref_v[kvh][j * hd + i];
                o /= sum;
                const double e = std::fabs(o - out[t * QD + static_cast<int64_t>(h) * hd + i]);
                max_err = std::max(max_err, std::isnan(e) ? 1e30 : e);
            }
            if (c.observe && t >= obs.from && t < obs.to) {
                for (int64_t j = obs_begin; j < std::min(obs_end, n_vis); ++j)
                    ref_votes[kvh * (obs_end - obs_begin) + (j - obs_begin)] += s[j] / sum;
            }
        }
    }
    for (size_t i = 0; i < votes.size(); ++i) max_vote_err = std::max(max_vote_err, std::fabs(votes[i] - ref_votes[i]));
    // |v| <= ~1.7 and probabilities sum to 1: the output error is the float rounding of the sums;
    // the Cephes exp is within ~2 ulp.
    CHECK(max_err < 2e-5, "attention %s: max |out - ref| = %.3g", c.name, max_err);
    CHECK(max_vote_err < 2e-5, "attention %s: max |votes - ref| = %.3g", c.name, max_vote_err);
    std::printf("attention %-28s max err %.2e votes %.2e\n", c.name, max_err, max_vote_err);
    emit(std::string("attn/") + c.name, out.data(), out.size());
    if (c.observe) emit(std::string("votes/") + c.name, votes.data(), votes.size());
}

void check_exp() {
    double max_rel = 0.0;
    for (int i = 0; i <= 100000; ++i) {
        const float x = -88.0f * static_cast<float>(i) / 100000.0f;
        float lanes[simd::kLanes];
        simd::store(lanes, simd::exp_neg(simd::set1(x)));
        const double e = std::exp(static_cast<double>(x));
        if (x > -80.0f) max_rel = std::max(max_rel, std::fabs(lanes[0] - e) / e);
        CHECK(lanes[0] == exp_neg(x) || std::fabs(lanes[0] - exp_neg(x)) <= 1e-7 * exp_neg(x), "exp_neg(%g)", x);
    }
    CHECK(max_rel < 5e-7, "vector exp max rel err %.3g", max_rel);
    std::printf("exp: max rel err %.2e (%s, %d lanes)\n", max_rel, simd::kName, simd::kLanes);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 1) dump = std::fopen(argv[1], "wb");
    std::printf("cpu_features: %s; simd %s, %d lanes, %d registers\n", cpu_features().c_str(), simd::kName,
                simd::kLanes, simd::kRegs);
    check_exp();
    check_gemm();
    const AttnCase cases[] = {
        {"prefill_f16_hd64", 6, 2, 64, {}, {}, DType::F16, 0, 150, false},
        {"prefill_f32_hd64_obs", 6, 2, 64, {}, {}, DType::F32, 0, 70, true},
        {"prefill_q8_0_hd64", 6, 2, 64, {}, {}, DType::Q8_0, 0, 90, false},
        {"prefix_mixed_hd64_obs", 6, 2, 64, {DType::F16, DType::Q8_0, DType::Q4_0}, {40, 70, 33}, DType::F16, 30, 50, true},
        {"decode_split_f16_hd64", 6, 2, 64, {DType::Q8_0}, {100}, DType::F16, 700, 1, false},
        {"decode_f32_hd128", 4, 4, 128, {}, {}, DType::F32, 300, 1, false},
        {"prefill_f16_hd32_mha", 4, 4, 32, {}, {}, DType::F16, 5, 40, false},
        {"prefill_f16_hd24", 6, 3, 24, {DType::F16}, {20}, DType::F16, 10, 33, true},
        {"prefill_f32_hd20_rows", 2, 1, 20, {}, {}, DType::F32, 3, 25, true},
        {"prefill_f16_hd96_group5", 10, 2, 96, {}, {}, DType::F16, 17, 70, false},
        // at most 4 rows per task (one token's GQA heads, a few MHA tokens): keys read in place
        {"decode_q8_0_tail_prefix_f16", 6, 2, 64, {DType::F16}, {65}, DType::Q8_0, 190, 1, false},
        {"few_tokens_mha_f16_causal", 3, 3, 64, {}, {}, DType::F16, 130, 3, false},
        {"decode_group4_f32_hd32", 8, 2, 32, {DType::Q4_0}, {64}, DType::F32, 61, 1, true},
    };
    for (const auto& c : cases) check_attention(c);
    if (dump) std::fclose(dump);
    std::printf("%s (%d failures)\n", fails ? "FAILED" : "OK", fails);
    return fails != 0;
}
