#include "llm/executor.h"

#include <algorithm>
#include <cstring>

namespace x2l {

void eval_rows_at(LlmContext& ctx, int64_t n_embd, int64_t n_vocab, int64_t n, int64_t n_batch, int n_pos_axes,
                  const int32_t* pos, const RowSource& rows, std::vector<float>& last_logits,
                  std::vector<float>* all_out, const Interrupt* interrupt) {
    if (n <= 0) return;
    if (all_out) all_out->resize(static_cast<size_t>(n) * n_vocab);
    last_logits.resize(n_vocab);
    std::vector<float> x;
    std::vector<int32_t> batch_pos;  // [n_pos_axes, m]
    const int64_t before = ctx.size();
    try {
        for (int64_t b = 0; b < n; b += n_batch) {
            check_interrupt(interrupt);
            const int64_t m = std::min(n_batch, n - b);
            x.resize(static_cast<size_t>(m) * n_embd);
            rows(b, m, x.data());
            batch_pos.resize(static_cast<size_t>(m) * n_pos_axes);
            for (int a = 0; a < n_pos_axes; ++a) {
                std::memcpy(batch_pos.data() + a * m, pos + a * n + b, sizeof(int32_t) * m);
            }
            const bool last = b + m == n;
            if (all_out) {
                ctx.forward(x.data(), m, batch_pos.data(), m, all_out->data() + b * n_vocab);
                if (last) std::memcpy(last_logits.data(), all_out->data() + (n - 1) * n_vocab, sizeof(float) * n_vocab);
            } else {
                ctx.forward(x.data(), m, batch_pos.data(), last ? 1 : 0, last_logits.data());
            }
        }
    } catch (...) {
        ctx.truncate(before);
        throw;
    }
}

void eval_rows(LlmContext& ctx, int64_t n_embd, int64_t n_vocab, int64_t n, int64_t n_batch, int32_t start,
               const RowSource& rows, std::vector<float>& last_logits, std::vector<float>* all_out, int n_pos_axes,
               const Interrupt* interrupt) {
    if (n <= 0) return;
    std::vector<int32_t> pos(static_cast<size_t>(n) * n_pos_axes);  // [n_pos_axes, n]
    for (int a = 0; a < n_pos_axes; ++a) {
        for (int64_t i = 0; i < n; ++i) pos[a * n + i] = static_cast<int32_t>(start + i);
    }
    eval_rows_at(ctx, n_embd, n_vocab, n, n_batch, n_pos_axes, pos.data(), rows, last_logits, all_out, interrupt);
}

}  // namespace x2l
