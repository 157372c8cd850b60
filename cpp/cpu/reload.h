// Asynchronous L-KV reload: copies the selected chunks' L-KVs from the host tier into recycled
// working buffers on a background thread, one layer at a time, so that layer l of the question's
// prefill can start as soon as layer l has arrived while later layers are still copying.
// (The CUDA backend does the same with cudaMemcpyAsync on a copy stream and one event per layer.)
#pragma once
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu/kv_cache.h"
#include "cpu/ops.h"

namespace x2l {

struct ReloadStats {
    size_t bytes = 0;          // bytes copied by the last reload
    double copy_seconds = 0;   // wall time of the copy thread
    double wait_seconds = 0;   // time compute spent blocked on it
    int n_chunks = 0;
};

class Reloader {
  public:
    Reloader() = default;
    ~Reloader();
    Reloader(const Reloader&) = delete;
    Reloader& operator=(const Reloader&) = delete;

    // Starts copying src[i] into working buffer i. Returns the working segments (valid until the
    // next start); their rows are usable for layer l once wait_layer(l) returns.
    std::vector<const KVSegment*> start(const std::vector<const KVSegment*>& src);
    // As start(), and the keys of src[i] are rotated by delta[i] positions on the way (the
    // working copy then sits delta[i] positions later than its source).
    std::vector<const KVSegment*> start(const std::vector<const KVSegment*>& src, const std::vector<int32_t>& delta,
                                        const RopeSpec& rope);
    void wait_layer(int layer);
    void wait_all();
    const ReloadStats& stats() const { return stats_; }
    size_t working_bytes() const;  // capacity of the recycled buffers

  private:
    void join();
    std::vector<std::unique_ptr<KVSegment>> buffers_;
    std::thread worker_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<int> layers_ready_{0};
    int n_layer_ = 0;
    ReloadStats stats_;
};

}  // namespace x2l
