// Small helpers shared by the binding files: float vectors handed to numpy without a copy, stats dicts.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <nanobind/stl/string.h>

#include <utility>
#include <vector>

#include "llm/executor.h"

namespace x2l_bind {

// A context's CUDA graph use as {captures, replays, note}.
inline nanobind::dict graph_stats_dict(const x2l::GraphStats& g) {
    nanobind::dict d;
    d["captures"] = g.captures;
    d["replays"] = g.replays;
    d["note"] = g.note;
    return d;
}

// Moves v into a numpy array owned by a capsule: [cols] when rows == 0, else [rows, cols].
inline nanobind::ndarray<nanobind::numpy, float> to_numpy(std::vector<float>&& v, size_t rows, size_t cols) {
    auto* heap = new std::vector<float>(std::move(v));
    nanobind::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    if (rows == 0) {
        size_t shape[1] = {cols};
        return nanobind::ndarray<nanobind::numpy, float>(heap->data(), 1, shape, owner);
    }
    size_t shape[2] = {rows, cols};
    return nanobind::ndarray<nanobind::numpy, float>(heap->data(), 2, shape, owner);
}

}  // namespace x2l_bind
