// Self-test of the CUDA emulator (run by tests/test_cuda_emu.py): each case is a small CUDA program,
// correct or with one planted bug of the kind the emulator exists to expose. Usage: selftest CASE
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CHECK(x)                                                                                 \
    do {                                                                                         \
        cudaError_t e_ = (x);                                                                    \
        if (e_ != cudaSuccess) {                                                                 \
            std::printf("error %s: %s\n", cudaGetErrorName(e_), cudaGetErrorString(e_));         \
            return 3;                                                                            \
        }                                                                                        \
    } while (0)

// Block sum of x[0..n) by 256 threads; `racy` leaves out the barrier between the shared-memory
// writes of the warp leaders and the reads of warp 0.
__global__ void block_sum_kernel(const float* x, int n, float* out, int racy) {
    __shared__ float red[8];
    float v = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    if (!racy) __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < 8 ? red[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0) *out = v;
    }
}

__global__ void scale_kernel(const float* x, float* y, int n, float s) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = s * x[i];
}

__global__ void read_at_kernel(const float* x, long idx, float* out) { *out = x[idx]; }

__global__ void shfl_after_exit_kernel(float* out) {
    if (threadIdx.x >= 16) return;
    float v = __shfl_xor_sync(0xffffffffu, 1.f, 1);
    out[threadIdx.x] = v;
}

__global__ void dyn_smem_kernel(float* out) {
    extern __shared__ float buf[];
    buf[threadIdx.x] = static_cast<float>(threadIdx.x);
    __syncthreads();
    out[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// One warp: C[16x16] = A[16x16] (row-major) x B[16x16] (column-major), f16 operands from shared memory.
// `offset` shifts the A tile by that many halves (an offset of 8 breaks the 256-bit alignment rule).
__global__ void wmma_kernel(const float* a, const float* b, float* c, int offset) {
    __shared__ __align__(32) __half as[16 * 16 + 16], bs[16 * 16];
    for (int i = threadIdx.x; i < 256; i += 32) {
        as[offset + i] = __float2half_rn(a[i]);
        bs[i] = __float2half_rn(b[i]);
    }
    __syncthreads();
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half, nvcuda::wmma::col_major> fb;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> fc;
    nvcuda::wmma::fill_fragment(fc, 1.f);
    nvcuda::wmma::load_matrix_sync(fa, as + offset, 16);
    nvcuda::wmma::load_matrix_sync(fb, bs, 16);
    nvcuda::wmma::mma_sync(fc, fa, fb, fc);
    nvcuda::wmma::store_matrix_sync(c, fc, 16, nvcuda::wmma::mem_row_major);
}

static int wmma(int offset) {
    std::vector<float> a(256), b(256), c(256);
    for (int i = 0; i < 256; ++i) a[i] = static_cast<float>(i % 7) - 3.f, b[i] = static_cast<float>(i % 5) * 0.5f;
    float *da, *db, *dc;
    CHECK(cudaMalloc(reinterpret_cast<void**>(&da), 1024));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&db), 1024));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&dc), 1024));
    CHECK(cudaMemcpy(da, a.data(), 1024, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(db, b.data(), 1024, cudaMemcpyHostToDevice));
    wmma_kernel<<<1, 32>>>(da, db, dc, offset);
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) {
        std::printf("sync %s\n", cudaGetErrorName(e));
        return 0;
    }
    CHECK(cudaMemcpy(c.data(), dc, 1024, cudaMemcpyDeviceToHost));
    int wrong = 0;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            float s = 1.f;
            for (int k = 0; k < 16; ++k) s += a[i * 16 + k] * b[j * 16 + k];  // B column j is contiguous
            wrong += c[i * 16 + j] != s;
        }
    std::printf("wrong %d\n", wrong);
    return 0;
}

static int reduce(bool racy) {
    const int n = 1000;
    std::vector<float> h(n);
    double want = 0;
    for (int i = 0; i < n; ++i) want += (h[i] = static_cast<float>(i % 7) - 2.f);
    float *x, *out;
    CHECK(cudaMalloc(reinterpret_cast<void**>(&x), n * sizeof(float)));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&out), sizeof(float)));
    CHECK(cudaMemcpy(x, h.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    block_sum_kernel<<<1, 256>>>(x, n, out, racy ? 1 : 0);
    CHECK(cudaGetLastError());
    float got = 0;
    CHECK(cudaMemcpy(&got, out, sizeof(float), cudaMemcpyDeviceToHost));
    std::printf("sum %g want %g\n", got, want);
    return 0;
}

// A copy stream uploads, the compute stream scales; with `wait`, the compute stream waits on the
// copy's event first.
static int streams(bool wait) {
    const int n = 4096;
    float *hx, *d_x, *d_y;
    CHECK(cudaHostAlloc(reinterpret_cast<void**>(&hx), n * sizeof(float), cudaHostAllocDefault));
    for (int i = 0; i < n; ++i) hx[i] = static_cast<float>(i);
    CHECK(cudaMalloc(reinterpret_cast<void**>(&d_x), n * sizeof(float)));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&d_y), n * sizeof(float)));
    cudaStream_t copy, compute;
    cudaEvent_t ready;
    CHECK(cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    CHECK(cudaMemcpyAsync(d_x, hx, n * sizeof(float), cudaMemcpyHostToDevice, copy));
    CHECK(cudaEventRecord(ready, copy));
    if (wait) CHECK(cudaStreamWaitEvent(compute, ready, 0));
    scale_kernel<<<(n + 255) / 256, 256, 0, compute>>>(d_x, d_y, n, 2.f);
    CHECK(cudaGetLastError());
    std::vector<float> y(n);
    CHECK(cudaStreamSynchronize(compute));
    CHECK(cudaMemcpy(y.data(), d_y, n * sizeof(float), cudaMemcpyDeviceToHost));
    int bad = 0;
    for (int i = 0; i < n; ++i) bad += y[i] != 2.f * i;
    std::printf("wrong %d of %d\n", bad, n);
    CHECK(cudaStreamSynchronize(copy));
    return 0;
}

// The host reads a pinned buffer that an async device-to-host copy targets, before and after
// synchronizing the stream.
static int pinned_read() {
    float *h, *d;
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CHECK(cudaHostAlloc(reinterpret_cast<void**>(&h), sizeof(float), cudaHostAllocDefault));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&d), sizeof(float)));
    const float one = 1.f;
    *h = 0.f;
    CHECK(cudaMemcpy(d, &one, sizeof(float), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpyAsync(h, d, sizeof(float), cudaMemcpyDeviceToHost, s));
    const float before = *h;
    CHECK(cudaStreamSynchronize(s));
    std::printf("before %g after %g\n", before, *h);
    return 0;
}

// The same copy into pageable memory: asynchronous too (the emulator does not promise it complete on
// return), so host code that reads it without a synchronization reads stale bytes.
static int pageable_read() {
    float* d;
    std::vector<float> h(1, 0.f);
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&d), sizeof(float)));
    const float one = 1.f;
    CHECK(cudaMemcpy(d, &one, sizeof(float), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpyAsync(h.data(), d, sizeof(float), cudaMemcpyDeviceToHost, s));
    const float before = h[0];
    CHECK(cudaStreamSynchronize(s));
    std::printf("before %g after %g\n", before, h[0]);
    return 0;
}

static int host_deref() {
    float* d;
    CHECK(cudaMalloc(reinterpret_cast<void**>(&d), 64 * sizeof(float)));
    std::printf("writing\n");
    std::fflush(stdout);
    d[3] = 1.f;  // a device pointer used on the host
    std::printf("survived\n");
    return 0;
}

static int out_of_bounds() {
    float *d, *out;
    CHECK(cudaMalloc(reinterpret_cast<void**>(&d), 1024 * sizeof(float)));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&out), sizeof(float)));
    read_at_kernel<<<1, 1>>>(d, 1024 + 64, out);
    CHECK(cudaDeviceSynchronize());
    std::printf("survived\n");
    return 0;
}

static int shfl_after_exit() {
    float* out;
    CHECK(cudaMalloc(reinterpret_cast<void**>(&out), 32 * sizeof(float)));
    shfl_after_exit_kernel<<<1, 32>>>(out);
    CHECK(cudaGetLastError());
    const cudaError_t e = cudaDeviceSynchronize();
    std::printf("sync %s: %s\n", cudaGetErrorName(e), cudaGetErrorString(e));
    std::printf("later %s\n", cudaGetErrorName(cudaMemset(out, 0, 4)));  // the failure is sticky
    return 0;
}

static int smem_limit() {
    float* out;
    CHECK(cudaMalloc(reinterpret_cast<void**>(&out), 256 * sizeof(float)));
    const size_t big = 64 * 1024;
    dyn_smem_kernel<<<1, 256, big>>>(out);
    std::printf("without attribute %s\n", cudaGetErrorName(cudaGetLastError()));
    CHECK(cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(big)));
    dyn_smem_kernel<<<1, 256, big>>>(out);
    std::printf("with attribute %s\n", cudaGetErrorName(cudaGetLastError()));
    float h[256];
    CHECK(cudaMemcpy(h, out, sizeof h, cudaMemcpyDeviceToHost));
    std::printf("reversed %d\n", h[0] == 255.f && h[255] == 0.f);
    return 0;
}

// A graph captured once reads its pinned input at every replay (the arguments stay as captured);
// bad = 1 puts a copy from pageable memory into the capture, bad = 2 an allocation: a GPU refuses both.
static int graph(int bad) {
    const int n = 256;
    float *pin, *d_x, *d_y;
    std::vector<float> pageable(n, 1.f), y(n);
    CHECK(cudaHostAlloc(reinterpret_cast<void**>(&pin), n * sizeof(float), cudaHostAllocDefault));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&d_x), n * sizeof(float)));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&d_y), n * sizeof(float)));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    const cudaError_t copy = cudaMemcpyAsync(d_x, bad == 1 ? pageable.data() : pin, n * sizeof(float), cudaMemcpyHostToDevice, s);
    std::printf("copy %s\n", cudaGetErrorName(copy));
    if (bad == 2) {
        float* more = nullptr;
        std::printf("malloc %s\n", cudaGetErrorName(cudaMalloc(reinterpret_cast<void**>(&more), 4)));
    }
    scale_kernel<<<1, n, 0, s>>>(d_x, d_y, n, 3.f);
    cudaGraph_t g = nullptr;
    const cudaError_t end = cudaStreamEndCapture(s, &g);
    std::printf("end %s graph %d\n", cudaGetErrorName(end), g != nullptr);
    if (!g) return 0;
    cudaGraphExec_t x;
    CHECK(cudaGraphInstantiateWithFlags(&x, g, 0));
    for (int r = 1; r <= 2; ++r) {
        for (int i = 0; i < n; ++i) pin[i] = static_cast<float>(r * i);
        CHECK(cudaGraphLaunch(x, s));
        CHECK(cudaStreamSynchronize(s));
        CHECK(cudaMemcpy(y.data(), d_y, n * sizeof(float), cudaMemcpyDeviceToHost));
        int wrong = 0;
        for (int i = 0; i < n; ++i) wrong += y[i] != 3.f * r * i;
        std::printf("replay %d wrong %d\n", r, wrong);
    }
    CHECK(cudaGraphExecDestroy(x));
    CHECK(cudaGraphDestroy(g));
    return 0;
}

// float -> half bits for the floats read from stdin, one per line of output.
static int half_bits() {
    float f;
    while (std::scanf("%f", &f) == 1) {
        const __half h = __float2half_rn(f);
        __half_raw r = h;
        std::printf("%u %.9g\n", static_cast<unsigned>(r.x), __half2float(h));
    }
    return 0;
}

int main(int argc, char** argv) {
    const std::string c = argc > 1 ? argv[1] : "";
    if (c == "reduce") return reduce(false);
    if (c == "reduce_racy") return reduce(true);
    if (c == "streams") return streams(true);
    if (c == "streams_missing_wait") return streams(false);
    if (c == "pinned_read") return pinned_read();
    if (c == "pageable_read") return pageable_read();
    if (c == "host_deref") return host_deref();
    if (c == "out_of_bounds") return out_of_bounds();
    if (c == "shfl_after_exit") return shfl_after_exit();
    if (c == "smem_limit") return smem_limit();
    if (c == "half_bits") return half_bits();
    if (c == "wmma") return wmma(0);
    if (c == "wmma_misaligned") return wmma(8);
    if (c == "graph") return graph(0);
    if (c == "graph_pageable") return graph(1);
    if (c == "graph_malloc") return graph(2);
    std::printf("unknown case %s\n", c.c_str());
    return 2;
}
