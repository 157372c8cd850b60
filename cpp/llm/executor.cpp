#include "llm/executor.h"

#include <algorithm>
#include <cstring>

namespace x2l {

void eval_rows(LlmContext& ctx, int64_t n_embd, int64_t n_vocab, int64_t n, int64_t n_batch, int32_t start,
               const RowSource& rows, std::vector<float>& last_logits, std::vector<float>* all_out,
               const Interrupt* interrupt) {
    if (n <= 0) return;
    if (all_out) all_out->resize(static_cast<size_t>(n) * n_vocab);
    last_logits.resize(n_vocab);
    std::vector<float> x;
    std::vector<int32_t> pos;
    const int64_t before = ctx.size();
    try {
        for (int64_t b = 0; b < n; b += n_batch) {
            check_interrupt(interrupt);
            const int64_t m = std::min(n_batch, n - b);
            x.resize(static_cast<size_t>(m) * n_embd);
            rows(b, m, x.data());
            pos.resize(m);
            for (int64_t i = 0; i < m; ++i) pos[i] = static_cast<int32_t>(start + b + i);
            const bool last = b + m == n;
            if (all_out) {
                ctx.forward(x.data(), m, pos.data(), m, all_out->data() + b * n_vocab);
                if (last) std::memcpy(last_logits.data(), all_out->data() + (n - 1) * n_vocab, sizeof(float) * n_vocab);
            } else {
                ctx.forward(x.data(), m, pos.data(), last ? 1 : 0, last_logits.data());
            }
        }
    } catch (...) {
        ctx.truncate(before);
        throw;
    }
}

}  // namespace x2l
