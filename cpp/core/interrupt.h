// Cooperative cancellation of long calls. Another thread (a server dropping a request) or the
// bindings' Ctrl-C poll asks; the work polls check() between layers and batches and stops by throwing
// Cancelled, leaving its own state as the call's contract says on failure (a KV cache keeps only the
// rows it had before the call).
#pragma once
#include <atomic>
#include <functional>

#include "core/common.h"

namespace x2l {

class Interrupt {
  public:
    // Any thread, any time: the running call (and every later one) stops at its next check().
    void request() { requested_.store(true, std::memory_order_relaxed); }
    // Lets calls run again (the owner does this when it starts a new operation).
    void clear() { requested_.store(false, std::memory_order_relaxed); }
    bool requested() const { return requested_.load(std::memory_order_relaxed); }
    // An extra condition polled by check() on the calling thread (the bindings install their Ctrl-C
    // poll for one call under the owner's lock); empty: none.
    void set_poll(std::function<bool()> poll) { poll_ = std::move(poll); }

    void check() const {
        if (requested()) throw Cancelled("cancelled");
        if (poll_ && poll_()) throw Cancelled("interrupted");
    }

  private:
    std::atomic<bool> requested_{false};
    std::function<bool()> poll_;
};

// check() through a pointer that may be null (no interrupt wired).
inline void check_interrupt(const Interrupt* i) {
    if (i) i->check();
}

}  // namespace x2l
