// Cancellation points between the layers of a long device call (the X²L prefill's layer-major forward,
// a batch of the vision tower). The host enqueues layer after layer far ahead of the device, so a flag
// checked between enqueues would stop nothing that is already queued. Before layer l is enqueued the
// gate waits until layer l - 2 has run on the device and then polls the interrupt: a cancel stops the
// call within about two layers of device work, and the device always has the previous layer queued
// while the host waits, so the check costs no idle time. No interrupt wired: the gate does nothing.
#pragma once
#include <array>
#include <memory>

#include "core/interrupt.h"
#include "cuda/backend.h"

namespace x2l {

class CudaLayerGate {
  public:
    CudaLayerGate(const Interrupt* interrupt, void* stream) : interrupt_(interrupt), stream_(stream) {
        if (interrupt_) {
            for (auto& e : done_) e = std::make_unique<CudaEvent>();
        }
    }

    // Before layer l is enqueued: throws Cancelled when a cancel was requested (the caller's error path
    // synchronizes and discards what the call had appended).
    void before_layer(int l) {
        if (!interrupt_) return;
        if (l >= 2) done_[static_cast<size_t>(l % 2)]->synchronize();  // layer l - 2 has run
        interrupt_->check();
    }
    // After layer l was enqueued.
    void after_layer(int l) {
        if (interrupt_) done_[static_cast<size_t>(l % 2)]->record(stream_);
    }

  private:
    const Interrupt* interrupt_;
    void* stream_;
    std::array<std::unique_ptr<CudaEvent>, 2> done_;  // after layers of even / odd index
};

}  // namespace x2l
