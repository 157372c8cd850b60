// x2l_edge._testing, CUDA part, in a test build without the CUDA backend: the same names as
// cuda_probes.cpp, each raising RuntimeError("CUDA backend not built").
#include <nanobind/nanobind.h>

#include <stdexcept>

namespace nb = nanobind;

void bind_cuda_probes(nb::module_& m) {
    const char* const names[] = {"cuda_matmul", "cuda_get_rows", "cuda_rms_norm", "cuda_layer_norm", "cuda_rope",
                                 "cuda_softmax", "cuda_swiglu", "cuda_gelu", "cuda_add", "cuda_mul", "cuda_attention",
                                 "cuda_pipeline_selftest", "cuda_copy_bandwidth", "cuda_pool2d", "cuda_rerotate_keys",
                                 "cuda_set_rows", "cuda_gather_rows", "cuda_matmul_speed", "cuda_attention_speed",
                                 "cuda_rope_axes", "cuda_pixel_shuffle"};
    for (const char* name : names)
        m.def(name, [](nb::args, nb::kwargs) -> nb::object { throw std::runtime_error("CUDA backend not built"); });
}
