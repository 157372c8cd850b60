#include "backends.h"

#include "core/common.h"
#ifdef X2L_HAVE_CUDA
#include "cuda/backend.h"
#endif

namespace x2l {

#ifdef X2L_HAVE_CUDA
bool cuda_built() { return true; }
int cuda_devices() { return cuda_device_count(); }
DeviceInfo cuda_device(int index) {
    const CudaDeviceInfo c = cuda_device_info(index);
    DeviceInfo d;
    d.name = c.name;
    d.total_mem = c.total_mem;
    d.free_mem = c.free_mem;
    d.cc_major = c.cc_major;
    d.cc_minor = c.cc_minor;
    d.integrated = c.integrated;
    d.can_map_host_memory = c.can_map_host_memory;
    d.multiprocessors = c.multiprocessors;
    return d;
}
#else
bool cuda_built() { return false; }
int cuda_devices() { return 0; }
DeviceInfo cuda_device(int) { throw Error("CUDA backend not built"); }
#endif

#ifdef X2L_CUDA_EMULATED
bool cuda_emulated() { return true; }
#else
bool cuda_emulated() { return false; }
#endif

}  // namespace x2l
