// x2l_edge._testing, CPU matmul part: probes of matmul (cpu/ops.cpp) and its tiled kernels (cpu/gemm.cpp):
//   matmul_test(type_id, w, n_in, x[T, n_in], n_threads=1, bias=None) -> y[T, n_out] via matmul()
//   matmul_fused_test([(type_id, w), ...], n_in, x, n_threads=1) -> [y...], one fused matmul() call
//   gemm_reference(type_id, w, n_in, x) -> y: the documented arithmetic in scalar code
//   vec_dot_matrix(type_id, w, n_in, x) -> y: one vec_dot per output (the decode-era path)
//   gemm_supported(type_id) -> bool
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <vector>

#include "core/common.h"
#include "cpu/gemm.h"
#include "cpu/ops.h"
#include "cpu/quant.h"
#include "core/threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using XArray = nb::ndarray<nb::numpy, const float, nb::ndim<2>, nb::c_contig>;
using BiasArray = nb::ndarray<nb::numpy, const float, nb::ndim<1>, nb::c_contig>;

x2l::Weight make_weight(uint32_t type_id, const nb::bytes& w, int64_t n_in) {
    const x2l::TypeInfo* ti = x2l::type_info(type_id);
    if (!ti || !ti->compute) throw x2l::FormatError("unsupported weight type " + std::to_string(type_id));
    x2l::Weight wt;
    wt.type = static_cast<x2l::DType>(type_id);
    wt.n_in = n_in;
    wt.row_bytes = x2l::row_bytes(wt.type, n_in);
    if (wt.row_bytes == 0 || w.size() % wt.row_bytes != 0) throw x2l::Error("weight bytes are not whole rows");
    wt.n_out = static_cast<int64_t>(w.size() / wt.row_bytes);
    wt.data = reinterpret_cast<const uint8_t*>(w.c_str());
    return wt;
}

nb::ndarray<nb::numpy, float> to_numpy(std::vector<float>&& v, size_t rows, size_t cols) {
    auto* heap = new std::vector<float>(std::move(v));
    nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    size_t shape[2] = {rows, cols};
    return nb::ndarray<nb::numpy, float>(heap->data(), 2, shape, owner);
}

void check_x(const XArray& x, int64_t n_in) {
    if (static_cast<int64_t>(x.shape(1)) != n_in) throw x2l::Error("x must be [n_tokens, n_in]");
}

// x quantized (or not) to the weights' dot type, in the gemm layout.
struct PackedActs {
    std::vector<uint8_t> rows, buf;
    x2l::GemmActs acts;
    PackedActs(x2l::DType wt, const float* x, int64_t T, int64_t n_in) {
        const x2l::DType at = x2l::dot_type(wt);
        buf.resize(x2l::gemm_acts_bytes(at, T, n_in));
        acts = x2l::gemm_acts(at, x, T, n_in, buf.data());
        if (at == x2l::DType::F32) return;
        const size_t rb = x2l::row_bytes(at, n_in);
        rows.resize(rb * static_cast<size_t>(T));
        for (int64_t t = 0; t < T; ++t) {
            x2l::quantize_row(at, x + t * n_in, rows.data() + t * rb, n_in);
            x2l::gemm_pack_token(acts, t, rows.data() + t * rb);
        }
    }
};

}  // namespace

void bind_gemm_probes(nb::module_& m) {
    m.def("gemm_supported", [](uint32_t type_id) { return x2l::gemm_supported(static_cast<x2l::DType>(type_id)); },
          "type_id"_a, "True when matmul uses a tiled kernel for this weight type in this build.");

    m.def("matmul_test", [](uint32_t type_id, nb::bytes w, int64_t n_in, XArray x, int n_threads,
                            std::optional<BiasArray> bias) {
        x2l::Weight wt = make_weight(type_id, w, n_in);
        check_x(x, n_in);
        if (bias && static_cast<int64_t>(bias->shape(0)) != wt.n_out) throw x2l::Error("bias must be [n_out]");
        const int64_t T = static_cast<int64_t>(x.shape(0));
        std::vector<float> y(static_cast<size_t>(T * wt.n_out));
        {
            nb::gil_scoped_release nogil;
            x2l::ThreadPool pool(n_threads);
            x2l::aligned_vector<uint8_t> scratch;
            x2l::matmul(pool, wt, x.data(), T, y.data(), scratch, bias ? bias->data() : nullptr);
        }
        return to_numpy(std::move(y), static_cast<size_t>(T), static_cast<size_t>(wt.n_out));
    }, "type_id"_a, "w"_a, "n_in"_a, "x"_a, "n_threads"_a = 1, "bias"_a = nb::none(),
       "y[T, n_out] = x · w^T (+ bias) through matmul() on a pool of n_threads.");

    m.def("matmul_fused_test", [](std::vector<std::pair<uint32_t, nb::bytes>> weights, int64_t n_in, XArray x,
                                  int n_threads) {
        check_x(x, n_in);
        const int64_t T = static_cast<int64_t>(x.shape(0));
        std::vector<x2l::Weight> ws;
        for (auto& [type_id, w] : weights) ws.push_back(make_weight(type_id, w, n_in));
        std::vector<std::vector<float>> ys(ws.size());
        std::vector<x2l::MatmulJob> jobs;
        for (size_t i = 0; i < ws.size(); ++i) {
            ys[i].resize(static_cast<size_t>(T * ws[i].n_out));
            jobs.push_back({&ws[i], ys[i].data(), nullptr});
        }
        {
            nb::gil_scoped_release nogil;
            x2l::ThreadPool pool(n_threads);
            x2l::aligned_vector<uint8_t> scratch;
            x2l::matmul(pool, x.data(), T, n_in, jobs.data(), static_cast<int>(jobs.size()), scratch);
        }
        nb::list out;
        for (size_t i = 0; i < ws.size(); ++i)
            out.append(to_numpy(std::move(ys[i]), static_cast<size_t>(T), static_cast<size_t>(ws[i].n_out)));
        return out;
    }, "weights"_a, "n_in"_a, "x"_a, "n_threads"_a = 1,
       "One fused matmul() over several weights sharing x: returns the list of outputs.");

    m.def("gemm_reference", [](uint32_t type_id, nb::bytes w, int64_t n_in, XArray x) {
        x2l::Weight wt = make_weight(type_id, w, n_in);
        check_x(x, n_in);
        const int64_t T = static_cast<int64_t>(x.shape(0));
        std::vector<float> y(static_cast<size_t>(T * wt.n_out));
        {
            nb::gil_scoped_release nogil;
            PackedActs pa(wt.type, x.data(), T, n_in);
            x2l::gemm_reference(wt.type, wt.data, wt.row_bytes, 0, wt.n_out, pa.acts, y.data(), wt.n_out, nullptr);
        }
        return to_numpy(std::move(y), static_cast<size_t>(T), static_cast<size_t>(wt.n_out));
    }, "type_id"_a, "w"_a, "n_in"_a, "x"_a, "The tiled kernels' arithmetic in portable scalar code.");

    m.def("vec_dot_matrix", [](uint32_t type_id, nb::bytes w, int64_t n_in, XArray x) {
        x2l::Weight wt = make_weight(type_id, w, n_in);
        check_x(x, n_in);
        const int64_t T = static_cast<int64_t>(x.shape(0));
        const x2l::DType at = x2l::dot_type(wt.type);
        std::vector<float> y(static_cast<size_t>(T * wt.n_out));
        {
            nb::gil_scoped_release nogil;
            x2l::aligned_vector<uint8_t> act(at == x2l::DType::F32 ? 0 : x2l::row_bytes(at, n_in));
            for (int64_t t = 0; t < T; ++t) {
                const float* xt = x.data() + t * n_in;
                const void* a = xt;
                if (at != x2l::DType::F32) {
                    x2l::quantize_row(at, xt, act.data(), n_in);
                    a = act.data();
                }
                for (int64_t r = 0; r < wt.n_out; ++r) y[t * wt.n_out + r] = x2l::vec_dot(wt.type, n_in, wt.row(r), a);
            }
        }
        return to_numpy(std::move(y), static_cast<size_t>(T), static_cast<size_t>(wt.n_out));
    }, "type_id"_a, "w"_a, "n_in"_a, "x"_a, "One vec_dot per output: the per-row reference path.");
}
