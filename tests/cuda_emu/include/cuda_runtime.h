// x2l-edge CUDA emulator: the subset of the CUDA runtime API and device built-ins that cpp/cuda/*.cu
// use, implemented on the CPU (tests/cuda_emu/emu_runtime.cpp). It exists so that CI machines without
// a GPU execute the CUDA backend's own source — kernels, launch wrappers, streams, events, the layer
// pipeline — against the CPU backend. It is a test tool: it never ships, it says nothing about speed,
// and passing under it is not the same as running on a GPU.
//
// Execution model
// - A kernel's blocks run one after another; the threads of a block are fibers on one OS thread.
//   A fiber runs until it reaches __syncthreads() or a warp shuffle, so code that reads another
//   thread's shared-memory writes without a barrier sees stale data (the order in which fibers run
//   alternates between launches to make that visible). Dynamic shared memory starts as NaN bytes.
// - Streams are lazy: work enqueued on a stream runs only when something forces it (a synchronize,
//   an event wait that depends on it, a blocking copy on the legacy stream, cudaFree...). A missing
//   event wait therefore reads stale data here instead of racing on a GPU. X2L_EMU_EARLY_COPIES=1 runs
//   copies as early as their stream allows instead, so a copy that overwrites a buffer a queued kernel
//   still has to read (a missing wait in the other direction) corrupts that kernel's input.
// - Device memory is its own mapping with guard pages on both sides and is inaccessible to host
//   code except while device work runs, so a host dereference of a device pointer, or a kernel that
//   reads past its allocation, stops the process with a message naming the address.
// - Stream capture records instead of running (see cudaStreamBeginCapture below);
//   X2L_EMU_REFUSE_CAPTURE=1 makes every capture fail, as a driver that refuses it would.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------- qualifiers
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, so a function-local static is the block's copy
#define __align__(n) __attribute__((aligned(n)))

// ---------------------------------------------------------------- vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ---------------------------------------------------------------- runtime types
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorNoKernelImageForDevice = 209,
    cudaErrorNotSupported = 801,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorHostMemoryAlreadyRegistered = 712,
    cudaErrorHostMemoryNotRegistered = 713,
    cudaErrorLaunchFailure = 719,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
};
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr {
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrIntegrated = 18,
    cudaDevAttrCanMapHostMemory = 19,
    cudaDevAttrUnifiedAddressing = 41,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
    cudaDevAttrHostRegisterReadOnlySupported = 113,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2 };
struct cudaPointerAttributes {
    cudaMemoryType type;
    int device;
    void* devicePointer;
    void* hostPointer;
};
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    int multiProcessorCount;
    int major, minor;
    int integrated;
    int canMapHostMemory;
};

struct CUstream_st;
struct CUevent_st;
struct CUgraph_st;
struct CUgraphExec_st;
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;
typedef CUgraph_st* cudaGraph_t;
typedef CUgraphExec_st* cudaGraphExec_t;
enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2,
};
enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2,
};

#define cudaStreamDefault 0x00u
#define cudaStreamNonBlocking 0x01u
#define cudaEventDefault 0x00u
#define cudaEventDisableTiming 0x02u
#define cudaHostAllocDefault 0x00u
#define cudaHostAllocPortable 0x01u
#define cudaHostAllocMapped 0x02u
#define cudaHostRegisterDefault 0x00u
#define cudaHostRegisterPortable 0x01u
#define cudaHostRegisterMapped 0x02u
#define cudaHostRegisterReadOnly 0x08u

// ---------------------------------------------------------------- runtime API
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);

cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned flags);
cudaError_t cudaMallocHost(void** p, size_t bytes);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaHostRegister(void* p, size_t bytes, unsigned flags);
cudaError_t cudaHostUnregister(void* p);
cudaError_t cudaHostGetDevicePointer(void** dev, void* host, unsigned flags);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p);

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);

cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);

// Stream capture and graphs: work enqueued on a capturing stream is recorded, not run (kernel
// arguments and copy addresses as they were then); cudaGraphLaunch enqueues the recorded work again.
// While a capture is active, what a GPU refuses to capture in the global and thread-local modes fails
// it: copies to or from pageable memory, synchronous copies, synchronizations, allocations and frees.
// Events on the capturing stream are not modelled (an error, so that code relying on them is noticed).
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status);
cudaError_t cudaGraphInstantiateWithFlags(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);

cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);

namespace x2l_emu {
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
    return x2l_emu::func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}

// ---------------------------------------------------------------- kernels
namespace x2l_emu {

struct ThreadState;
extern ThreadState* g_current;  // the fiber running device code (null on the host)
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void* dynamic_smem();
void syncthreads();
void device_fault(const char* what);  // a kernel broke a device rule: a sticky launch failure
uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask);

// A kernel invocation, type-erased: run(i) executes the body for the current fiber.
struct KernelBody {
    virtual ~KernelBody() = default;
    virtual void run() = 0;
};

// Validates the configuration and enqueues the kernel on its stream (or records a launch error).
void launch(const char* name, const void* func, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            KernelBody* body);  // takes ownership of body

template <class... P>
struct KernelCall : KernelBody {
    void (*fn)(P...);
    std::tuple<std::decay_t<P>...> args;
    template <class... A>
    KernelCall(void (*f)(P...), A&&... a) : fn(f), args(static_cast<std::decay_t<P>>(std::forward<A>(a))...) {}
    void run() override { std::apply(fn, args); }
};

// What `kernel<<<grid, block, smem, stream>>>(args...)` becomes (tests/cuda_emu/cu2cpp.py).
struct Launch {
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
    template <class... P, class... A>
    void run(const char* name, void (*fn)(P...), A&&... a) {
        static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
        launch(name, reinterpret_cast<const void*>(fn), grid, block, smem, stream,
               new KernelCall<P...>(fn, std::forward<A>(a)...));
    }
};

}  // namespace x2l_emu

#define threadIdx (::x2l_emu::thread_idx())
#define blockIdx (::x2l_emu::block_idx())
#define blockDim (::x2l_emu::block_dim())
#define gridDim (::x2l_emu::grid_dim())

inline void __syncthreads() { x2l_emu::syncthreads(); }
// The warp's lanes wait for each other (the emulator's warp rendezvous, as in a shuffle).
inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)x2l_emu::shfl_xor_bits(mask, 0, 0); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a register-sized value");
    (void)width;
    uint64_t bits = 0;
    __builtin_memcpy(&bits, &v, sizeof(T));
    bits = x2l_emu::shfl_xor_bits(mask, bits, lane_mask);
    T out;
    __builtin_memcpy(&out, &bits, sizeof(T));
    return out;
}

// ---------------------------------------------------------------- device math
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
// sin.approx / cos.approx: absolute error up to 2^-21.41 on [-pi, pi] (CUDA's documented bound),
// modelled pessimistically by rounding the exact value to a 2^-21 grid.
inline float x2l_emu_approx_trig(double v) { return static_cast<float>(std::nearbyint(v * 2097152.0) / 2097152.0); }
inline void __sincosf(float x, float* s, float* c) {
    *s = x2l_emu_approx_trig(std::sin(static_cast<double>(x)));
    *c = x2l_emu_approx_trig(std::cos(static_cast<double>(x)));
}
// Round-to-nearest arithmetic that the compiler must not contract into an fma (plain float ops here:
// the emulator is built without fma contraction on x86-64's baseline ISA).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

#include "cuda_fp16.h"
