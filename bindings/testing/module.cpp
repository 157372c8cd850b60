// x2l_edge._testing: kernel probes and speed entries for the test suite and the benchmarks, kept out
// of the user module x2l_edge._core. Built only with -DX2L_TESTING=ON (the README's test command); it
// raises the exception classes of x2l_edge._core. Its quantize/dequantize/vec_dot run this module's
// copy of the kernels, the one set_force_scalar switches.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>

#include "common.h"
#include "cpu/quant.h"

namespace nb = nanobind;
using namespace nb::literals;

void bind_gemm_probes(nb::module_& m);  // gemm_probes.cpp
void bind_cuda_probes(nb::module_& m);  // cuda_probes.cpp, or cuda_stubs.cpp in a build without CUDA
void bind_vlm_ops(nb::module_& m);      // vlm_ops_probes.cpp

NB_MODULE(_testing, m) {
    m.doc() = "x2l-edge kernel probes (test builds only)";
    x2l_bind::translate_errors(nb::module_::import_("x2l_edge._core"));

    m.def("dequantize", &x2l_bind::dequantize, "type_id"_a, "data"_a, "n"_a, "Dequantize a row of n values to float32.");
    m.def("quantize", &x2l_bind::quantize, "type_id"_a, "x"_a, "Quantize float32 values to a row of the given type.");
    m.def("vec_dot", [](uint32_t type_id, nb::bytes w_row, nb::ndarray<nb::numpy, float, nb::c_contig> x) {
        x2l::DType t = x2l_bind::checked_type(type_id);
        int64_t n = static_cast<int64_t>(x.size());
        if (x2l::row_bytes(t, n) != w_row.size()) throw x2l::Error("weight row size does not match x");
        x2l::DType at = x2l::dot_type(t);
        std::string act(x2l::row_bytes(at, n), '\0');
        x2l::quantize_row(at, x.data(), act.data(), n);
        return x2l::vec_dot(t, n, w_row.c_str(), act.data());
    }, "type_id"_a, "w_row"_a, "x"_a, "Dot product of a quantized weight row with float32 x (x quantized as the kernel does).");
    m.def("set_force_scalar", &x2l::set_force_scalar, "on"_a,
          "Route this module's dot products and quantizers through the portable scalar code.");

    bind_gemm_probes(m);
    bind_cuda_probes(m);
    bind_vlm_ops(m);
}
