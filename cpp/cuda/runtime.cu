// Devices, memory, streams, events and the layer-pipelined copy helper.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>

#include "core/common.h"
#include "cuda/common.cuh"
#include "cuda/backend.h"

#ifndef X2L_CUDA_ARCH_LIST
#define X2L_CUDA_ARCH_LIST "unknown"  // CMakeLists.txt defines it; a standalone compile (kernel_resources.py) does not
#endif

namespace x2l {

namespace cudak {

void throw_cuda(cudaError_t e, const char* what) {
    (void)cudaGetLastError();  // reset the last-error slot (sticky errors stay sticky regardless)
    std::string msg = std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e) + " (" +
                      cudaGetErrorName(e) + ")";
    if (e == cudaErrorMemoryAllocation) throw BudgetError(msg);
    throw Error(msg);
}

void throw_arg(const char* fn, const char* msg) { throw Error(std::string(fn) + ": " + msg); }

}  // namespace cudak

using cudak::check;

// ---------------------------------------------------------------- devices

namespace {

// cudaGetDeviceCount's error text, "" when it succeeded.
std::string count_error(int* n) {
    *n = 0;
    const cudaError_t e = cudaGetDeviceCount(n);
    if (e == cudaSuccess) return "";
    // Cleared so that it is not reported by an unrelated later call.
    std::string msg = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")";
    (void)cudaGetLastError();
    *n = 0;
    if (e == cudaErrorInsufficientDriver) {
        int drv = 0, rt = 0;
        (void)cudaDriverGetVersion(&drv);
        (void)cudaRuntimeGetVersion(&rt);
        (void)cudaGetLastError();
        msg += drv > 0 ? "; the driver supports CUDA " + std::to_string(drv / 1000) + "." + std::to_string(drv % 1000 / 10) +
                             ", this build's runtime needs " + std::to_string(rt / 1000) + "." + std::to_string(rt % 1000 / 10)
                       : "; no NVIDIA driver found";
    }
    return msg;
}

}  // namespace

int cuda_device_count() {
    int n = 0;
    // No driver (cudaErrorInsufficientDriver), no device (cudaErrorNoDevice), ...: 0, the CPU backend
    // takes over; cuda_probe_error() says why.
    (void)count_error(&n);
    return n;
}

std::string cuda_probe_error() {
    int n = 0;
    return count_error(&n);
}

namespace cudak {
namespace {
__global__ void probe_kernel(int* out) { *out = 0x2c2e; }
}  // namespace
}  // namespace cudak

std::string cuda_device_unusable(int dev) {
    // A device counts only once a kernel of this build has run on it: a GPU older than the build's
    // architectures (no kernel image), a driver that cannot JIT the PTX, a broken context all show here.
    static std::mutex mu;
    static std::map<int, std::string> verdict;
    std::lock_guard<std::mutex> lock(mu);
    auto it = verdict.find(dev);
    if (it != verdict.end()) return it->second;
    std::string why;
    const int n = cuda_device_count();
    if (dev < 0 || dev >= n) {
        why = "no CUDA device " + std::to_string(dev) + " (" + std::to_string(n) + " present)";
        const std::string e = cuda_probe_error();
        if (!e.empty()) why += "; " + e;
        return why;  // not cached: a driver may come later in tests, never for a real process
    }
    int prev = 0;
    auto step = [&why](cudaError_t e, const char* what) {
        if (e != cudaSuccess && why.empty()) why = std::string(what) + ": " + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")";
        return e == cudaSuccess;
    };
    if (step(cudaGetDevice(&prev), "cudaGetDevice") && step(cudaSetDevice(dev), "cudaSetDevice")) {
        int* d = nullptr;
        if (step(cudaMalloc(reinterpret_cast<void**>(&d), sizeof(int)), "cudaMalloc")) {
            cudak::probe_kernel<<<1, 1>>>(d);
            int got = 0;
            if (step(cudaGetLastError(), "a test kernel's launch") && step(cudaDeviceSynchronize(), "a test kernel") &&
                step(cudaMemcpy(&got, d, sizeof(int), cudaMemcpyDeviceToHost), "cudaMemcpy") && got != 0x2c2e)
                why = "a test kernel ran but did not write its result";
            cudaFree(d);
        }
        cudaSetDevice(prev);
    }
    (void)cudaGetLastError();
    if (!why.empty()) {
        int major = 0, minor = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        (void)cudaGetLastError();
        why += " on sm_" + std::to_string(major) + std::to_string(minor) +
               " (this build's architectures: " X2L_CUDA_ARCH_LIST "; rebuild with -C cmake.define.X2L_CUDA_ARCHITECTURES=" +
               std::to_string(major) + std::to_string(minor) + ")";
    }
    verdict[dev] = why;
    return why;
}

void cuda_require_device(int dev) {
    if (dev < 0 || dev >= cuda_device_count()) {
        throw Error("CUDA device " + std::to_string(dev) + " is not available (" + std::to_string(cuda_device_count()) +
                    " present)");
    }
    const std::string why = cuda_device_unusable(dev);
    if (!why.empty()) throw Error("CUDA device " + std::to_string(dev) + " is not usable: " + why);
}

namespace cudak {

size_t smem_optin(int dev) {
    static std::mutex mu;
    static std::map<int, size_t> cache;
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(dev);
    if (it != cache.end()) return it->second;
    int v = 0;
    check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute(smem opt-in)");
    return cache[dev] = static_cast<size_t>(std::max(v, 48 * 1024));
}

bool allow_dynamic_smem(const void* func, size_t bytes, const char* what) {
    if (bytes <= 48 * 1024) return true;
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    if (bytes > smem_optin(dev)) return false;
    // Once per (kernel, device), at the device's opt-in limit: later launches of any size below it
    // need no call (cudaFuncSetAttribute is not free, and it was on every launch).
    static std::mutex mu;
    static std::map<std::pair<const void*, int>, bool> done;
    std::lock_guard<std::mutex> lock(mu);
    bool& set = done[{func, dev}];
    if (!set) {
        check(cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_optin(dev))), what);
        set = true;
    }
    return true;
}

}  // namespace cudak

namespace {

// MemAvailable from /proc/meminfo in bytes, 0 when unreadable.
size_t meminfo_available() {
    std::ifstream f("/proc/meminfo");
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind("MemAvailable:", 0) == 0) {
            std::istringstream is(line.substr(13));
            unsigned long long kb = 0;
            is >> kb;
            return static_cast<size_t>(kb) * 1024;
        }
    }
    return 0;
}

int attr(cudaDeviceAttr a, int dev) {
    int v = 0;
    check(cudaDeviceGetAttribute(&v, a, dev), "cudaDeviceGetAttribute");
    return v;
}

}  // namespace

CudaDeviceInfo cuda_device_info(int dev) {
    const int n = cuda_device_count();
    if (dev < 0 || dev >= n) throw Error("cuda_device_info: no CUDA device " + std::to_string(dev));
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
    CudaDeviceInfo info;
    info.name = prop.name;
    info.total_mem = prop.totalGlobalMem;
    info.cc_major = attr(cudaDevAttrComputeCapabilityMajor, dev);
    info.cc_minor = attr(cudaDevAttrComputeCapabilityMinor, dev);
    info.integrated = attr(cudaDevAttrIntegrated, dev) != 0;
    info.can_map_host_memory = attr(cudaDevAttrCanMapHostMemory, dev) != 0;
    info.multiprocessors = attr(cudaDevAttrMultiProcessorCount, dev);

    // cudaMemGetInfo reports on the current device (and creates its context).
    int prev = 0;
    check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != dev) check(cudaSetDevice(dev), "cudaSetDevice");
    size_t free_b = 0, total_b = 0;
    const cudaError_t e = cudaMemGetInfo(&free_b, &total_b);
    if (prev != dev) check(cudaSetDevice(prev), "cudaSetDevice");
    check(e, "cudaMemGetInfo");
    info.free_mem = free_b;
    if (info.integrated) {
        // Jetson: device memory is the shared LPDDR; cudaMemGetInfo ignores reclaimable page cache and
        // under-reports what can still be allocated, MemAvailable is the kernel's own estimate.
        const size_t avail = meminfo_available();
        if (avail > 0) info.free_mem = avail;
    }
    return info;
}

void cuda_set_device(int dev) { check(cudaSetDevice(dev), "cudaSetDevice"); }

int cuda_get_device() {
    int d = 0;
    check(cudaGetDevice(&d), "cudaGetDevice");
    return d;
}

void cuda_device_synchronize() { check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

// ---------------------------------------------------------------- device buffer

CudaDeviceBuffer::CudaDeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes == 0) return;
    check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
}

CudaDeviceBuffer::~CudaDeviceBuffer() {
    if (ptr_) cudaFree(ptr_);  // errors here are from earlier work; a destructor cannot report them
}

CudaDeviceBuffer::CudaDeviceBuffer(CudaDeviceBuffer&& o) noexcept
    : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}

CudaDeviceBuffer& CudaDeviceBuffer::operator=(CudaDeviceBuffer&& o) noexcept {
    if (this != &o) {
        if (ptr_) cudaFree(ptr_);
        ptr_ = std::exchange(o.ptr_, nullptr);
        bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
}

void CudaDeviceBuffer::upload(const void* host_src, size_t bytes, size_t offset, void* stream) {
    if (offset + bytes > bytes_) throw Error("CudaDeviceBuffer::upload: out of range");
    if (bytes == 0) return;
    char* dst = static_cast<char*>(ptr_) + offset;
    if (stream)
        check(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, cudak::as_stream(stream)), "cudaMemcpyAsync");
    else {
        // cudaMemcpy from pageable memory may return before the DMA lands, and kernels on
        // non-blocking streams are not ordered after the legacy stream: wait so the data is there.
        check(cudaMemcpy(dst, host_src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
        check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
    }
}

void CudaDeviceBuffer::download(void* host_dst, size_t bytes, size_t offset, void* stream) const {
    if (offset + bytes > bytes_) throw Error("CudaDeviceBuffer::download: out of range");
    if (bytes == 0) return;
    const char* src = static_cast<const char*>(ptr_) + offset;
    if (stream) {
        // Ordered after the stream's work; the host reads host_dst on return, and a pageable destination
        // is only promised complete on return for some copies and drivers: wait for it.
        check(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, cudak::as_stream(stream)), "cudaMemcpyAsync");
        check(cudaStreamSynchronize(cudak::as_stream(stream)), "cudaStreamSynchronize");
    } else
        check(cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
}

void CudaDeviceBuffer::zero(void* stream) {
    if (bytes_ == 0) return;
    if (stream)
        check(cudaMemsetAsync(ptr_, 0, bytes_, cudak::as_stream(stream)), "cudaMemsetAsync");
    else {
        check(cudaMemset(ptr_, 0, bytes_), "cudaMemset");  // asynchronous for device memory
        check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
    }
}

// ---------------------------------------------------------------- pinned host buffer

// The device address of freshly pinned, mapped host memory; if the lookup fails, `unpin` releases
// the pinning (host is set to null) and the error is thrown.
template <class Unpin>
static void* mapped_or_unpin(void*& host, Unpin unpin) {
    void* dev = nullptr;
    const cudaError_t e = cudaHostGetDevicePointer(&dev, host, 0);
    if (e != cudaSuccess) {
        unpin(host);
        host = nullptr;
        check(e, "cudaHostGetDevicePointer");
    }
    return dev;
}

CudaHostBuffer::CudaHostBuffer(size_t bytes, bool mapped) : bytes_(bytes) {
    if (bytes == 0) return;
    const unsigned flags = mapped ? (cudaHostAllocMapped | cudaHostAllocPortable) : cudaHostAllocPortable;
    check(cudaHostAlloc(&host_, bytes, flags), "cudaHostAlloc");
    if (mapped) dev_ = mapped_or_unpin(host_, cudaFreeHost);
}

CudaHostBuffer::~CudaHostBuffer() {
    if (host_) cudaFreeHost(host_);
}

CudaHostBuffer::CudaHostBuffer(CudaHostBuffer&& o) noexcept
    : host_(std::exchange(o.host_, nullptr)), dev_(std::exchange(o.dev_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}

CudaHostBuffer& CudaHostBuffer::operator=(CudaHostBuffer&& o) noexcept {
    if (this != &o) {
        if (host_) cudaFreeHost(host_);
        host_ = std::exchange(o.host_, nullptr);
        dev_ = std::exchange(o.dev_, nullptr);
        bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
}

namespace {

// cudaDevAttrHostRegisterReadOnlySupported of the current device: whether read-only pages (a file
// mapped PROT_READ, such as an index opened with mmap=True) can be page-locked at all.
bool readonly_register_supported() {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrHostRegisterReadOnlySupported, dev) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return v != 0;
}

}  // namespace

CudaHostRegistration::CudaHostRegistration(const void* host, size_t bytes, bool mapped) {
    if (!host || bytes == 0) return;
    void* p = const_cast<void*>(host);  // registration does not write
    const unsigned flags = cudaHostRegisterPortable | (mapped ? cudaHostRegisterMapped : 0u);
    cudaError_t e = cudaHostRegister(p, bytes, flags);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (!readonly_register_supported()) {
            throw Error(std::string("cudaHostRegister: ") + cudaGetErrorString(e) +
                        " (and this device cannot page-lock read-only memory: cudaDevAttrHostRegisterReadOnlySupported is 0)");
        }
        e = cudaHostRegister(p, bytes, flags | cudaHostRegisterReadOnly);  // e.g. a read-only file mapping
    }
    check(e, "cudaHostRegister");
    host_ = p;
    if (mapped) dev_ = mapped_or_unpin(host_, cudaHostUnregister);
}

std::shared_ptr<CudaHostRegistration> cuda_register_file_mapping(const void* p, size_t bytes, bool mapped, size_t* offset) {
    // The mapping of /proc/self/maps that holds [p, p + bytes): a file mapped without write access.
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    uintptr_t lo = 0, hi = 0;
    {
        std::ifstream maps("/proc/self/maps");
        std::string line;
        while (std::getline(maps, line)) {
            unsigned long l = 0, h = 0;
            char perms[8] = {0};
            char path[2] = {0};
            if (std::sscanf(line.c_str(), "%lx-%lx %7s %*s %*s %*s %1s", &l, &h, perms, path) < 3) continue;
            if (a >= l && a < h) {
                if (perms[1] == 'w' || path[0] != '/' || a + bytes > h) return nullptr;
                lo = l;
                hi = h;
                break;
            }
        }
    }
    if (!lo) return nullptr;
    static std::mutex mu;
    static std::map<std::pair<uintptr_t, bool>, std::weak_ptr<CudaHostRegistration>> live;
    std::lock_guard<std::mutex> lock(mu);
    std::weak_ptr<CudaHostRegistration>& slot = live[{lo, mapped}];
    std::shared_ptr<CudaHostRegistration> reg = slot.lock();
    if (!reg) {
        reg = std::make_shared<CudaHostRegistration>(reinterpret_cast<const void*>(lo), hi - lo, mapped);
        slot = reg;
    }
    *offset = a - lo;
    return reg;
}

CudaHostRegistration::~CudaHostRegistration() {
    if (host_) cudaHostUnregister(host_);
}

void* cuda_mapped_device_ptr(const void* host_ptr) {
    void* d = nullptr;
    const cudaError_t e = cudaHostGetDevicePointer(&d, const_cast<void*>(host_ptr), 0);
    if (e == cudaSuccess) return d;
    // With unified addressing, pinned host memory has the same address on the device; this covers
    // a pointer into the middle of an allocation should the lookup above insist on its start.
    int dev = 0, uva = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetAttribute(&uva, cudaDevAttrUnifiedAddressing, dev) == cudaSuccess &&
        uva) {
        cudaPointerAttributes pa{};
        if (cudaPointerGetAttributes(&pa, host_ptr) == cudaSuccess && pa.type == cudaMemoryTypeHost) {
            (void)cudaGetLastError();
            return const_cast<void*>(host_ptr);
        }
    }
    check(e, "cudaHostGetDevicePointer");
    return nullptr;
}

// ---------------------------------------------------------------- streams and events

CudaStream::CudaStream(bool non_blocking) {
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, non_blocking ? cudaStreamNonBlocking : cudaStreamDefault), "cudaStreamCreate");
    s_ = s;
}

CudaStream::~CudaStream() {
    if (s_) cudaStreamDestroy(cudak::as_stream(s_));
}

CudaStream::CudaStream(CudaStream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}

CudaStream& CudaStream::operator=(CudaStream&& o) noexcept {
    if (this != &o) {
        if (s_) cudaStreamDestroy(cudak::as_stream(s_));
        s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
}

void CudaStream::synchronize() const { check(cudaStreamSynchronize(cudak::as_stream(s_)), "cudaStreamSynchronize"); }

static cudaEvent_t as_event(void* e) { return static_cast<cudaEvent_t>(e); }

CudaEvent::CudaEvent(bool timing) {
    cudaEvent_t e = nullptr;
    check(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming), "cudaEventCreate");
    e_ = e;
}

CudaEvent::~CudaEvent() {
    if (e_) cudaEventDestroy(as_event(e_));
}

CudaEvent::CudaEvent(CudaEvent&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}

CudaEvent& CudaEvent::operator=(CudaEvent&& o) noexcept {
    if (this != &o) {
        if (e_) cudaEventDestroy(as_event(e_));
        e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
}

void CudaEvent::record(void* stream) { check(cudaEventRecord(as_event(e_), cudak::as_stream(stream)), "cudaEventRecord"); }

void CudaEvent::wait_in(void* stream) const {
    check(cudaStreamWaitEvent(cudak::as_stream(stream), as_event(e_), 0), "cudaStreamWaitEvent");
}

void CudaEvent::synchronize() const { check(cudaEventSynchronize(as_event(e_)), "cudaEventSynchronize"); }

bool CudaEvent::done() const {
    const cudaError_t e = cudaEventQuery(as_event(e_));
    if (e == cudaErrorNotReady) return false;
    check(e, "cudaEventQuery");
    return true;
}

float CudaEvent::elapsed_ms_since(const CudaEvent& start) const {
    float ms = 0.f;
    check(cudaEventElapsedTime(&ms, as_event(start.e_), as_event(e_)), "cudaEventElapsedTime");
    return ms;
}

// ---------------------------------------------------------------- staging

CudaStaging::CudaStaging() = default;
CudaStaging::~CudaStaging() {
    if (landed_) cudaEventSynchronize(static_cast<cudaEvent_t>(landed_->handle()));  // buf_ may still be a DMA source
}
CudaStaging::CudaStaging(CudaStaging&&) noexcept = default;
CudaStaging& CudaStaging::operator=(CudaStaging&& o) noexcept {
    if (this != &o) {
        if (landed_) cudaEventSynchronize(static_cast<cudaEvent_t>(landed_->handle()));
        buf_ = std::move(o.buf_);
        landed_ = std::move(o.landed_);
        used_ = std::exchange(o.used_, 0);
        stream_ = std::exchange(o.stream_, nullptr);
    }
    return *this;
}

void CudaStaging::upload(void* dev_dst, const void* host_src, size_t bytes, void* stream) {
    if (bytes == 0) return;
    if (stream_ && stream != stream_ && landed_) landed_->synchronize();  // a new stream: start afresh
    if (stream != stream_) used_ = buf_ ? buf_->size() : 0;
    stream_ = stream;
    const size_t at = (used_ + 255) / 256 * 256;
    if (!buf_ || at + bytes > buf_->size()) {
        // Full (or new): every copy from it must have landed before it is reused or freed.
        if (landed_) landed_->synchronize();
        if (!buf_ || bytes > buf_->size()) buf_.reset(new CudaHostBuffer(std::max<size_t>(2 * bytes, 4096)));
        used_ = 0;
    }
    const size_t off = (used_ + 255) / 256 * 256;
    char* pinned = static_cast<char*>(buf_->data()) + off;
    std::memcpy(pinned, host_src, bytes);
    cuda_copy_h2d_async(dev_dst, pinned, bytes, stream);
    if (!landed_) landed_.reset(new CudaEvent(false));
    landed_->record(stream);
    used_ = off + bytes;
}

// ---------------------------------------------------------------- graphs

CudaGraph::~CudaGraph() { reset(); }

void CudaGraph::reset() {
    if (exec_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
    if (graph_) cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
    exec_ = graph_ = nullptr;
}

void CudaGraph::capture(void* stream, const std::function<void()>& enqueue) {
    reset();
    const cudaStream_t s = cudak::as_stream(stream);
    // Thread-local mode: a call of this thread that cannot be captured (an allocation, a synchronous
    // copy) fails the capture instead of silently running outside it; other threads are unaffected.
    check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    cudaGraph_t g = nullptr;
    try {
        enqueue();
    } catch (...) {
        cudaStreamEndCapture(s, &g);  // ends the (invalidated) capture; the stream is usable again
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        throw;
    }
    const cudaError_t e = cudaStreamEndCapture(s, &g);
    if (e != cudaSuccess) {
        if (g) cudaGraphDestroy(g);
        cudak::throw_cuda(e, "cudaStreamEndCapture");
    }
    graph_ = g;
    cudaGraphExec_t x = nullptr;
    const cudaError_t ie = cudaGraphInstantiateWithFlags(&x, g, 0);
    if (ie != cudaSuccess) {
        reset();
        cudak::throw_cuda(ie, "cudaGraphInstantiate");
    }
    exec_ = x;
}

void CudaGraph::launch(void* stream) const {
    if (!exec_) throw Error("CudaGraph::launch: nothing captured");
    check(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), cudak::as_stream(stream)), "cudaGraphLaunch");
}

void cuda_copy_h2d_async(void* dst, const void* src, size_t bytes, void* stream) {
    if (bytes == 0) return;
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cudak::as_stream(stream)), "cudaMemcpyAsync(H2D)");
}

void cuda_copy_d2h_async(void* dst, const void* src, size_t bytes, void* stream) {
    if (bytes == 0) return;
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cudak::as_stream(stream)), "cudaMemcpyAsync(D2H)");
}

void cuda_copy_d2d_async(void* dst, const void* src, size_t bytes, void* stream) {
    if (bytes == 0) return;
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cudak::as_stream(stream)), "cudaMemcpyAsync(D2D)");
}

// ---------------------------------------------------------------- layer pipeline

CudaLayerPipeline::CudaLayerPipeline(size_t slot_bytes, int n_slots, bool zero_copy)
    : zero_copy_(zero_copy), slot_bytes_(slot_bytes), copy_stream_(true) {
    if (zero_copy) return;
    if (n_slots < 1) throw Error("CudaLayerPipeline: n_slots must be >= 1");
    slots_.resize(static_cast<size_t>(n_slots));
    for (auto& s : slots_) s.buf = CudaDeviceBuffer(slot_bytes);
}

CudaLayerPipeline::~CudaLayerPipeline() {
    // Copies may still target the slots: finish them before the buffers are freed.
    if (copy_stream_.handle()) cudaStreamSynchronize(cudak::as_stream(copy_stream_.handle()));
}

void CudaLayerPipeline::begin(int layer) {
    if (open_ >= 0) throw Error("CudaLayerPipeline::begin: previous layer not ended");
    if (layer < 0) throw Error("CudaLayerPipeline::begin: negative layer");
    if (zero_copy_) {
        open_ = 0;
        return;
    }
    const int idx = layer % n_slots();
    Slot& s = slots_[static_cast<size_t>(idx)];
    if (s.layer >= 0 && !s.released_recorded)
        throw Error("CudaLayerPipeline::begin: slot still holds layer " + std::to_string(s.layer) +
                    " (release() it first, or reset())");
    // The slot's previous layer may still be read by compute work enqueued before release().
    if (s.released_recorded) s.released.wait_in(copy_stream_.handle());
    s.released_recorded = false;
    s.layer = layer;
    open_ = idx;
    offset_ = 0;
}

void* CudaLayerPipeline::take(size_t bytes) {
    if (open_ < 0) throw Error("CudaLayerPipeline::take: call begin() first");
    if (zero_copy_) throw Error("CudaLayerPipeline::take: a zero-copy pipeline has no slots");
    const size_t off = aligned(offset_);
    if (off + bytes > slot_bytes_) throw BudgetError("CudaLayerPipeline: slot full");
    offset_ = off + bytes;
    return static_cast<char*>(slots_[static_cast<size_t>(open_)].buf.data()) + off;
}

void* CudaLayerPipeline::stage(const void* host_src, size_t bytes) {
    if (open_ < 0) throw Error("CudaLayerPipeline::stage: call begin() first");
    if (zero_copy_) return cuda_mapped_device_ptr(host_src);
    void* dst = take(bytes);
    cuda_copy_h2d_async(dst, host_src, bytes, copy_stream_.handle());
    return dst;
}

void CudaLayerPipeline::end() {
    if (open_ < 0) throw Error("CudaLayerPipeline::end: call begin() first");
    if (!zero_copy_) slots_[static_cast<size_t>(open_)].ready.record(copy_stream_.handle());
    open_ = -1;
}

void CudaLayerPipeline::reset() {
    cudak::check(cudaStreamSynchronize(cudak::as_stream(copy_stream_.handle())), "cudaStreamSynchronize");
    for (auto& s : slots_) {
        s.layer = -1;
        s.released_recorded = false;
    }
    open_ = -1;
    offset_ = 0;
}

void CudaLayerPipeline::wait_ready(int layer, void* compute_stream) {
    if (zero_copy_) return;
    Slot& s = slots_[static_cast<size_t>(layer % n_slots())];
    if (s.layer != layer) throw Error("CudaLayerPipeline::wait_ready: layer " + std::to_string(layer) + " is not staged");
    s.ready.wait_in(compute_stream);
}

void CudaLayerPipeline::release(int layer, void* compute_stream) {
    if (zero_copy_) return;
    Slot& s = slots_[static_cast<size_t>(layer % n_slots())];
    if (s.layer != layer) throw Error("CudaLayerPipeline::release: layer " + std::to_string(layer) + " is not staged");
    s.released.record(compute_stream);
    s.released_recorded = true;
}

}  // namespace x2l
