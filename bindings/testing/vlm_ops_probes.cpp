// Test bindings for the VLM index and rotation functions (cpu/mrope.h, cpu/vision_layout.h), under
// _testing.vlm_ops; tests/test_vlm_ops.py checks them against tests/vlm_numpy.py. Nothing in the
// package calls them: the model layers use the C++ functions directly.
//   mrope_axes(head_dim, theta, sections) / vision_rope_axes(head_dim, theta=10000) -> (freq, axis)
//   rope_apply(x[n, heads, head_dim], freq, axis, pos[n_axes, n]) -> rotated copy of x
//   mrope_positions(kinds[n] uint8, grids [(t, h, w)], merge=2, seconds_per_grid=None,
//                   tokens_per_second=0, text_after="max") -> (pos[3, n] int32, delta)
//   qwen_patch_rows(frames[T, 3, H, W], patch=14, merge=2) -> rows[(H/p)(W/p), 3*T*p*p]
//   qwen_patch_coords(h, w, merge=2) -> [2, h*w] int32
//   qwen_windows(h, w, merge, window_cells) -> (window_of_token, unit_order, window_tokens) int32
//   pixel_shuffle(x[side*side, c], scale) -> [(side/scale)^2, c*scale^2]
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/mrope.h"
#include "cpu/vision_layout.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <class T>
nb::ndarray<nb::numpy, T> owned(std::vector<T>&& v, std::initializer_list<size_t> shape) {
    auto* heap = new std::vector<T>(std::move(v));
    nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
    return nb::ndarray<nb::numpy, T>(heap->data(), shape.size(), shape.begin(), owner);
}

std::tuple<nb::ndarray<nb::numpy, float>, nb::ndarray<nb::numpy, uint8_t>> axes_out(x2l::RopeAxes&& ra) {
    const size_t half = ra.freq.size();
    return {owned(std::move(ra.freq), {half}), owned(std::move(ra.axis), {half})};
}

using F32 = nb::ndarray<nb::numpy, const float, nb::c_contig>;
using I32 = nb::ndarray<nb::numpy, const int32_t, nb::ndim<2>, nb::c_contig>;
using U8 = nb::ndarray<nb::numpy, const uint8_t, nb::ndim<1>, nb::c_contig>;

nb::ndarray<nb::numpy, float> rope_apply(F32 x, nb::ndarray<nb::numpy, const float, nb::ndim<1>, nb::c_contig> freq,
                                         U8 axis, I32 pos) {
    if (x.ndim() != 3) throw std::invalid_argument("x must be [n_tokens, n_heads, head_dim]");
    const int64_t n = static_cast<int64_t>(x.shape(0));
    const int n_heads = static_cast<int>(x.shape(1)), head_dim = static_cast<int>(x.shape(2));
    if (head_dim % 2 || freq.shape(0) != static_cast<size_t>(head_dim / 2) || axis.shape(0) != freq.shape(0)) {
        throw std::invalid_argument("freq and axis must have head_dim/2 entries");
    }
    if (static_cast<int64_t>(pos.shape(1)) != n) throw std::invalid_argument("pos must be [n_axes, n_tokens]");
    x2l::RopeAxes ra;
    ra.head_dim = head_dim;
    ra.n_axes = static_cast<int>(pos.shape(0));
    ra.freq.assign(freq.data(), freq.data() + freq.shape(0));
    ra.axis.assign(axis.data(), axis.data() + axis.shape(0));
    for (uint8_t a : ra.axis) {
        if (a >= ra.n_axes) throw std::invalid_argument("axis index beyond the position rows");
    }
    std::vector<float> cos(static_cast<size_t>(n) * (head_dim / 2)), sin(cos.size());
    x2l::rope_axes_cos_sin(ra, pos.data(), n, cos.data(), sin.data());
    std::vector<float> y(x.data(), x.data() + x.size());
    x2l::rope_neox_apply(y.data(), n, n_heads, head_dim, cos.data(), sin.data());
    return owned(std::move(y), {static_cast<size_t>(n), static_cast<size_t>(n_heads), static_cast<size_t>(head_dim)});
}

std::pair<nb::ndarray<nb::numpy, int32_t>, int64_t> mrope_positions(
        U8 kinds, const std::vector<std::tuple<int, int, int>>& grids, int merge,
        std::optional<std::vector<float>> seconds_per_grid, float tokens_per_second, const std::string& text_after) {
    x2l::TextAfterMedia rule;
    if (text_after == "max") rule = x2l::TextAfterMedia::MaxPlusOne;
    else if (text_after == "spatial") rule = x2l::TextAfterMedia::Spatial;
    else throw std::invalid_argument("text_after must be 'max' or 'spatial'");
    const int64_t n = static_cast<int64_t>(kinds.shape(0));
    std::vector<x2l::TokenKind> k(n);
    for (int64_t i = 0; i < n; ++i) {
        if (kinds.data()[i] > 2) throw std::invalid_argument("token kinds are 0 (text), 1 (image), 2 (video)");
        k[i] = static_cast<x2l::TokenKind>(kinds.data()[i]);
    }
    // seconds_per_grid lists one value per *video*, in prompt order, as transformers takes it.
    std::vector<x2l::MediaGrid> g(grids.size());
    for (size_t m = 0; m < grids.size(); ++m) {
        g[m].t = std::get<0>(grids[m]);
        g[m].h = std::get<1>(grids[m]);
        g[m].w = std::get<2>(grids[m]);
    }
    size_t m = 0, video = 0;
    for (int64_t i = 0, j = 0; i < n; i = j) {
        for (j = i; j < n && k[j] == k[i];) ++j;
        if (k[i] == x2l::TokenKind::Text || m >= g.size()) continue;  // run/grid count errors: mrope_positions
        if (k[i] == x2l::TokenKind::Video && seconds_per_grid) {
            if (video >= seconds_per_grid->size()) throw std::invalid_argument("fewer seconds_per_grid than videos");
            g[m].seconds_per_grid = (*seconds_per_grid)[video++];
        }
        ++m;
    }
    std::vector<int32_t> pos(3 * static_cast<size_t>(n));
    const int64_t delta = x2l::mrope_positions(k.data(), n, g.data(), static_cast<int>(g.size()), merge,
                                               tokens_per_second, rule, pos.data());
    return {owned(std::move(pos), {3, static_cast<size_t>(n)}), delta};
}

}  // namespace

void bind_vlm_ops(nb::module_& parent) {
    nb::module_ m = parent.def_submodule("vlm_ops", "Test bindings for the VLM index/rotation functions");
    m.def("mrope_axes", [](int head_dim, float theta, std::tuple<int, int, int> s) {
        const int sections[3] = {std::get<0>(s), std::get<1>(s), std::get<2>(s)};
        return axes_out(x2l::mrope_axes(head_dim, theta, sections));
    }, "head_dim"_a, "theta"_a, "sections"_a);
    m.def("vision_rope_axes", [](int head_dim, float theta) { return axes_out(x2l::vision_rope_axes(head_dim, theta)); },
          "head_dim"_a, "theta"_a = 10000.0f);
    m.def("rope_apply", &rope_apply, "x"_a, "freq"_a, "axis"_a, "pos"_a);
    m.def("mrope_positions", &mrope_positions, "kinds"_a, "grids"_a, "merge"_a = 2, "seconds_per_grid"_a = nb::none(),
          "tokens_per_second"_a = 0.0f, "text_after"_a = "max");
    m.def("qwen_patch_rows", [](F32 frames, int patch, int merge) {
        if (frames.ndim() != 4 || frames.shape(1) != 3) throw std::invalid_argument("frames must be [T, 3, H, W]");
        const int t = static_cast<int>(frames.shape(0)), hh = static_cast<int>(frames.shape(2));
        const int ww = static_cast<int>(frames.shape(3));
        if (patch < 1 || hh % patch || ww % patch) throw std::invalid_argument("frame size is not a multiple of patch");
        const size_t n = static_cast<size_t>(hh / patch) * (ww / patch), len = 3ULL * t * patch * patch;
        std::vector<float> rows(n * len);
        x2l::qwen_patch_rows(frames.data(), t, hh, ww, patch, merge, rows.data());
        return owned(std::move(rows), {n, len});
    }, "frames"_a, "patch"_a = 14, "merge"_a = 2);
    m.def("qwen_patch_coords", [](int h, int w, int merge) {
        if (h < 1 || w < 1) throw std::invalid_argument("empty patch grid");
        const size_t n = static_cast<size_t>(h) * w;
        std::vector<int32_t> rc(2 * n);
        x2l::qwen_patch_coords(h, w, merge, rc.data(), rc.data() + n);
        return owned(std::move(rc), {2, n});
    }, "h"_a, "w"_a, "merge"_a = 2);
    m.def("qwen_windows", [](int h, int w, int merge, int window_cells) {
        x2l::WindowLayout wl = x2l::qwen_windows(h, w, merge, window_cells);
        const size_t a = wl.window_of_token.size(), b = wl.unit_order.size(), c = wl.window_tokens.size();
        return std::make_tuple(owned(std::move(wl.window_of_token), {a}), owned(std::move(wl.unit_order), {b}),
                               owned(std::move(wl.window_tokens), {c}));
    }, "h"_a, "w"_a, "merge"_a, "window_cells"_a);
    m.def("pixel_shuffle", [](nb::ndarray<nb::numpy, const float, nb::ndim<2>, nb::c_contig> x, int scale) {
        const int64_t seq = static_cast<int64_t>(x.shape(0)), c = static_cast<int64_t>(x.shape(1));
        const int side = static_cast<int>(std::lround(std::sqrt(static_cast<double>(seq))));
        if (static_cast<int64_t>(side) * side != seq) throw std::invalid_argument("x must be a square grid of tokens");
        if (scale < 1 || side % scale) throw std::invalid_argument("grid side is not a multiple of scale");
        const size_t g = static_cast<size_t>(side / scale);
        std::vector<float> y(g * g * c * scale * scale);
        x2l::pixel_shuffle(x.data(), side, c, scale, y.data());
        return owned(std::move(y), {g * g, static_cast<size_t>(c) * scale * scale});
    }, "x"_a, "scale"_a);
}
