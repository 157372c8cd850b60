// The backends this build has, and the one place that picks one (backends.cpp holds the only
// X2L_HAVE_CUDA in the code above cpp/cuda/).
#pragma once
#include <cstddef>
#include <string>

namespace x2l {

// ---------------------------------------------------------------- what this build and machine have

bool cuda_built();     // the CUDA backend was compiled in
bool cuda_emulated();  // ... against the CPU emulator of tests/cuda_emu (a test build, not a GPU)
int cuda_devices();    // usable CUDA devices now (0 without the backend, a driver or a device; never throws)

struct DeviceInfo {
    std::string name;
    size_t total_mem = 0, free_mem = 0;  // bytes; free: MemAvailable of /proc/meminfo on integrated GPUs
    int cc_major = 0, cc_minor = 0;
    bool integrated = false;             // Jetson: host and device share one DRAM
    bool can_map_host_memory = false;
    int multiprocessors = 0;
};
DeviceInfo cuda_device(int index);  // Error when the backend is not built or the device does not exist

}  // namespace x2l
