#include "cpu/reload.h"

#include <chrono>
#include <cstring>

#include "core/common.h"
#include "cpu/quant.h"

namespace x2l {

Reloader::~Reloader() { join(); }

void Reloader::join() {
    if (worker_.joinable()) worker_.join();
}

std::vector<const KVSegment*> Reloader::start(const std::vector<const KVSegment*>& src) {
    return start(src, std::vector<int32_t>(src.size(), 0), RopeSpec{});
}

// Copies one layer of src into dst, rotating every key row by delta positions.
static void copy_layer_rotated(const KVSegment& src, KVSegment& dst, int layer, int32_t delta, const RopeSpec& spec) {
    const int hd = src.head_dim();
    std::vector<float> row(hd);
    for (int h = 0; h < src.n_head_kv(); ++h) {
        for (int64_t i = 0; i < src.size(); ++i) {
            dequantize_row(src.type(), src.k_row(layer, h, i), row.data(), hd);
            rope(row.data(), 1, hd, spec.rope_dim, delta, spec.inv_freq, spec.type);
            quantize_row(dst.type(), row.data(), dst.k_row_mut(layer, h, i), hd);
            std::memcpy(dst.v_row_mut(layer, h, i), src.v_row(layer, h, i), src.row_bytes());
        }
    }
}

std::vector<const KVSegment*> Reloader::start(const std::vector<const KVSegment*>& src,
                                              const std::vector<int32_t>& delta, const RopeSpec& spec) {
    join();
    if (delta.size() != src.size()) throw Error("reload: one delta per segment");
    stats_ = ReloadStats{};
    stats_.n_chunks = static_cast<int>(src.size());
    n_layer_ = src.empty() ? 0 : src[0]->n_layer();
    // Recycle buffers; (re)allocate only when a chunk needs more room than the buffer has.
    if (buffers_.size() < src.size()) buffers_.resize(src.size());
    std::vector<const KVSegment*> out;
    for (size_t i = 0; i < src.size(); ++i) {
        const KVSegment& s = *src[i];
        auto& b = buffers_[i];
        if (!b || b->capacity() < s.size() || b->type() != s.type() || b->n_layer() != s.n_layer() ||
            b->n_head_kv() != s.n_head_kv() || b->head_dim() != s.head_dim()) {
            b = std::make_unique<KVSegment>(s.type(), s.n_layer(), s.n_head_kv(), s.head_dim(), s.size());
        }
        b->assign_meta(s);
        b->shift_positions(delta[i]);
        stats_.bytes += s.used_bytes();
        out.push_back(b.get());
    }
    layers_ready_.store(0);
    if (src.empty()) return out;
    std::vector<const KVSegment*> srcs = src;
    worker_ = std::thread([this, srcs, delta, spec] {
        auto t0 = std::chrono::steady_clock::now();
        for (int l = 0; l < n_layer_; ++l) {
            for (size_t i = 0; i < srcs.size(); ++i) {
                if (delta[i] == 0) {
                    buffers_[i]->copy_layer(*srcs[i], l);
                } else {
                    copy_layer_rotated(*srcs[i], *buffers_[i], l, delta[i], spec);
                }
            }
            {
                std::lock_guard<std::mutex> lock(mu_);
                layers_ready_.store(l + 1);
            }
            cv_.notify_all();
        }
        stats_.copy_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    });
    return out;
}

void Reloader::wait_layer(int layer) {
    if (layers_ready_.load() > layer || n_layer_ == 0) return;
    auto t0 = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return layers_ready_.load() > layer; });
    stats_.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void Reloader::wait_all() {
    if (n_layer_ > 0) wait_layer(n_layer_ - 1);
    join();
}

size_t Reloader::working_bytes() const {
    size_t b = 0;
    for (const auto& s : buffers_) b += s ? s->nbytes() : 0;
    return b;
}

}  // namespace x2l
