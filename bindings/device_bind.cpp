// Bindings for what the backends offer: whether this build has CUDA, and the devices it sees.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "backends.h"

namespace nb = nanobind;
using namespace nb::literals;

void bind_device(nb::module_& m) {
    m.def("cuda_built", &x2l::cuda_built, "True when the CUDA backend was compiled in.");
    m.def("cuda_emulated", &x2l::cuda_emulated,
          "True in the test build whose CUDA backend runs on the CPU emulator (tests/cuda_emu), not a GPU.");
    m.def("cuda_device_count", &x2l::cuda_devices, "Number of CUDA devices the driver reports (0 without a driver or device).");
    m.def("cuda_probe_error", &x2l::cuda_why_no_device,
          "Why cuda_device_count() is 0: the CUDA runtime's error (e.g. a driver too old for this build), '' when none.");
    m.def("cuda_device_check", &x2l::cuda_why_unusable, "dev"_a = 0,
          "'' when a kernel of this build ran on device dev, otherwise why not (e.g. no kernel image for its "
          "architecture). Cached per device.");
    m.def("cuda_device_info", [](int dev) {
        const x2l::DeviceInfo info = x2l::cuda_device(dev);
        nb::dict d;
        d["name"] = info.name;
        d["total_mem"] = info.total_mem;
        d["free_mem"] = info.free_mem;
        d["cc_major"] = info.cc_major;
        d["cc_minor"] = info.cc_minor;
        d["integrated"] = info.integrated;
        d["can_map_host_memory"] = info.can_map_host_memory;
        d["multiprocessors"] = info.multiprocessors;
        return d;
    }, "dev"_a = 0,
       "dict: name, total_mem, free_mem (MemAvailable on integrated GPUs), cc_major, cc_minor, integrated, "
       "can_map_host_memory, multiprocessors.");
}
