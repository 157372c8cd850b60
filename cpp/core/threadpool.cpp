#include "core/threadpool.h"

#include <chrono>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define X2L_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define X2L_PAUSE() __asm__ __volatile__("yield")
#else
#define X2L_PAUSE() ((void)0)
#endif

namespace x2l {

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
}

void ThreadPool::worker(int ith) {
    uint64_t seen = 0;
    for (;;) {
        // Spin for a short while (a job usually follows within microseconds during a forward pass).
        auto spin_start = std::chrono::steady_clock::now();
        int spins = 0;
        while (generation_.load(std::memory_order_acquire) == seen) {
            X2L_PAUSE();
            if (++spins == 1024) {
                spins = 0;
                std::this_thread::yield();
                if (std::chrono::steady_clock::now() - spin_start > std::chrono::milliseconds(2)) {
                    std::unique_lock<std::mutex> lock(mu_);
                    sleepers_.fetch_add(1);
                    cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
                    sleepers_.fetch_sub(1);
                    break;
                }
            }
        }
        if (stop_.load()) return;
        seen = generation_.load(std::memory_order_acquire);
        (*job_)(ith, n_threads_);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
    if (n_threads_ == 1) {
        fn(0, 1);
        return;
    }
    job_ = &fn;
    pending_.store(n_threads_ - 1, std::memory_order_release);
    {
        // The lock orders the generation bump against a worker that is about to sleep.
        std::lock_guard<std::mutex> lock(mu_);
        generation_.fetch_add(1, std::memory_order_acq_rel);
    }
    if (sleepers_.load() > 0) cv_.notify_all();
    fn(0, n_threads_);
    // Spin briefly, then yield: on an oversubscribed machine a descheduled worker would otherwise
    // keep this thread burning its whole time slice.
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
        if (spins < 4096) {
            X2L_PAUSE();
        } else {
            std::this_thread::yield();
        }
    }
    job_ = nullptr;
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    if (n_threads_ == 1 || n == 1) {
        fn(0, n);
        return;
    }
    run([&](int ith, int nth) {
        int64_t per = (n + nth - 1) / nth;
        int64_t b = ith * per, e = b + per < n ? b + per : n;
        if (b < e) fn(b, e);
    });
}

}  // namespace x2l
