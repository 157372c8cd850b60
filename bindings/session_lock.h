// One call at a time per LlmSession, and interrupts inside long calls. Every binding that runs on a
// session (its own context, the X²L prefill and decoder, which share its executor and thread pool)
// goes through call_locked(): the GIL is released first, then the session's mutex is taken, so a
// thread waiting for the session never blocks Python and the lock order is always GIL -> mutex.
#pragma once
#include <nanobind/nanobind.h>

#include <chrono>
#include <mutex>

#include "core/common.h"
#include "llm/session.h"

namespace x2l_bind {

inline bool on_main_thread() {
    static const unsigned long main_id = nanobind::cast<unsigned long>(
        nanobind::module_::import_("threading").attr("main_thread")().attr("ident"));
    return PyThread_get_thread_ident() == main_id;
}

// Runs fn() with the GIL released and s's mutex held. From the main thread a Ctrl-C poll is installed
// on s's interrupt (the GIL is taken for PyErr_CheckSignals at most every 50 ms): a signal stops a long
// call between layers and its Python exception (KeyboardInterrupt) is raised. s.cancel() from another
// thread stops it with x2l_edge.CancelledError (the request is then cleared). fn must be safe to run
// without the GIL.
template <class F>
void call_locked(x2l::LlmSession& s, F&& fn) {
    const bool poll_signals = on_main_thread();
    bool signalled = false;
    try {
        nanobind::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lock(s.mutex());
        struct PollScope {
            x2l::Interrupt& i;
            ~PollScope() { i.set_poll(nullptr); }
        } scope{s.interrupt()};
        if (poll_signals) {
            auto last = std::chrono::steady_clock::now();
            s.interrupt().set_poll([&signalled, last]() mutable {
                const auto now = std::chrono::steady_clock::now();
                if (now - last < std::chrono::milliseconds(50)) return false;
                last = now;
                nanobind::gil_scoped_acquire gil;
                signalled = PyErr_CheckSignals() != 0;
                return signalled;
            });
        }
        fn();
    } catch (const x2l::Cancelled&) {
        // The request is delivered: this call raised it. A caller that drives the native objects itself
        // (not through an operation of the Python Session, which clears it when one starts) would
        // otherwise see every later call cancelled too.
        s.clear_cancel();
        if (signalled && PyErr_Occurred()) throw nanobind::python_error();
        throw;
    }
}

}  // namespace x2l_bind
