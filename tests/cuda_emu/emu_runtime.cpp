// x2l-edge CUDA emulator: the runtime (see include/cuda_runtime.h for what it models and why).
#include <cuda_runtime.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace x2l_emu {

// ---------------------------------------------------------------- configuration (environment)

namespace {

long env_long(const char* name, long dflt) {
    const char* v = std::getenv(name);
    return v && *v ? std::strtol(v, nullptr, 10) : dflt;
}

struct Config {
    bool integrated = env_long("X2L_EMU_INTEGRATED", 0) != 0;  // model a Jetson (shared DRAM)
    bool no_device = env_long("X2L_EMU_NO_DEVICE", 0) != 0;
    size_t mem_bytes = static_cast<size_t>(env_long("X2L_EMU_MEM_MB", 4096)) << 20;
    bool protect = env_long("X2L_EMU_PROTECT", 1) != 0;  // device memory inaccessible to host code
    int order = static_cast<int>(env_long("X2L_EMU_ORDER", -1));  // 0 forward, 1 reverse, -1 alternate
    // Copies (and memsets) run as soon as their stream reaches them, kernels stay lazy: exposes a copy
    // that overwrites a buffer a queued kernel has yet to read (a missing wait in the other direction).
    bool early_copies = env_long("X2L_EMU_EARLY_COPIES", 0) != 0;
    // Stream capture fails as on a driver that refuses it (the fallback of code that uses graphs).
    bool refuse_capture = env_long("X2L_EMU_REFUSE_CAPTURE", 0) != 0;
    // A driver older than the runtime (cudaGetDeviceCount fails with cudaErrorInsufficientDriver).
    bool old_driver = env_long("X2L_EMU_OLD_DRIVER", 0) != 0;
    // A device the build has no kernel image for (e.g. sm_75 with sm_80+ code): every launch fails.
    bool no_kernel_image = env_long("X2L_EMU_NO_KERNEL_IMAGE", 0) != 0;
    // The opt-in shared memory per block in KB (0: sm_87's / sm_89's); 64 models sm_75.
    long smem_optin_kb = env_long("X2L_EMU_SMEM_OPTIN_KB", 0);
    // cudaDevAttrHostRegisterReadOnlySupported (Jetson: read-only file mappings can be registered).
    bool readonly_register = env_long("X2L_EMU_READONLY_REGISTER", 1) != 0;
    // A pageable host source copied on a stream other than the legacy one fails: such a copy makes the
    // driver synchronize the stream with the host, which the hot paths must not do (pinned staging).
    bool strict_pageable = env_long("X2L_EMU_STRICT_PAGEABLE", 0) != 0;
};
const Config& cfg() {
    static Config c;
    return c;
}

std::recursive_mutex& api_mutex() {
    static std::recursive_mutex m;
    return m;
}
#define EMU_LOCK std::lock_guard<std::recursive_mutex> emu_lock_(api_mutex())

// ---------------------------------------------------------------- errors

cudaError_t g_last = cudaSuccess;    // cleared by cudaGetLastError
cudaError_t g_sticky = cudaSuccess;  // a failed kernel: every later call reports it
std::string g_detail;                // what the emulator saw, appended to cudaGetErrorString

cudaError_t fail(cudaError_t e, const std::string& detail) {
    g_last = e;
    g_detail = detail;
    return e;
}
void fail_sticky(const std::string& detail) {
    if (g_sticky == cudaSuccess) {
        g_sticky = cudaErrorLaunchFailure;
        g_detail = detail;
        std::fprintf(stderr, "x2l cuda emulator: %s\n", detail.c_str());
    }
    g_last = cudaErrorLaunchFailure;
}
#define EMU_STICKY_CHECK \
    if (g_sticky != cudaSuccess) return g_sticky

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));
constexpr int kSmemPerBlock = 48 * 1024;  // dynamic shared memory a kernel gets without opting in
size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// ---------------------------------------------------------------- device memory

// One mapping per cudaMalloc: [guard page][pages][guard page]; the user range ends at the end of
// the pages (rounded to 256 bytes, cudaMalloc's alignment) so that a read past it faults.
struct DeviceAlloc {
    char* map = nullptr;
    size_t map_len = 0;
    char* inner = nullptr;
    size_t inner_len = 0;
    char* user = nullptr;
    size_t size = 0;
};
std::map<uintptr_t, DeviceAlloc> g_dev;  // keyed by user pointer
size_t g_dev_used = 0;
int g_access_depth = 0;            // > 0 while device work runs
const char* g_kernel = nullptr;    // the kernel running, for fault messages

// The entry of an address map (keyed by start, with a .size) whose [start, start + max(size, 1))
// holds p.
template <class T>
const T* entry_at(const std::map<uintptr_t, T>& m, const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = m.upper_bound(a);
    if (it == m.begin()) return nullptr;
    --it;
    return a - it->first < std::max<size_t>(it->second.size, 1) ? &it->second : nullptr;
}

const DeviceAlloc* find_dev(const void* p) { return entry_at(g_dev, p); }
// The allocation whose mapping (guards included) holds p, for fault messages.
const DeviceAlloc* find_mapping(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    for (const auto& kv : g_dev) {
        const uintptr_t b = reinterpret_cast<uintptr_t>(kv.second.map);
        if (a >= b && a < b + kv.second.map_len) return &kv.second;
    }
    return nullptr;
}

void protect_one(const DeviceAlloc& d, bool accessible) {
    if (d.inner_len) mprotect(d.inner, d.inner_len, accessible ? (PROT_READ | PROT_WRITE) : PROT_NONE);
}

// RAII: device memory readable and writable while device work (a kernel, a copy) runs.
struct DeviceAccess {
    DeviceAccess() {
        if (g_access_depth++ == 0 && cfg().protect)
            for (const auto& kv : g_dev) protect_one(kv.second, true);
    }
    ~DeviceAccess() {
        if (--g_access_depth == 0 && cfg().protect)
            for (const auto& kv : g_dev) protect_one(kv.second, false);
    }
};

// ---------------------------------------------------------------- pinned host memory

struct PinnedRange {
    char* p = nullptr;
    size_t size = 0;
    bool allocated = false;  // cudaHostAlloc (else cudaHostRegister)
    bool mapped = false;
};
std::map<uintptr_t, PinnedRange> g_pinned;  // keyed by p

// The pinned range holding all of [p, p + bytes).
const PinnedRange* find_pinned(const void* p, size_t bytes = 1) {
    const PinnedRange* r = entry_at(g_pinned, p);
    return r && static_cast<const char*>(p) + std::max<size_t>(bytes, 1) <= r->p + r->size ? r : nullptr;
}

// ---------------------------------------------------------------- fault messages

struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
    const void* addr = info->si_addr;
    const DeviceAlloc* d = find_mapping(addr);
    char msg[512];
    if (d) {
        const char* a = static_cast<const char*>(addr);
        if (a >= d->inner && a < d->inner + d->inner_len && g_access_depth == 0)
            std::snprintf(msg, sizeof msg,
                          "x2l cuda emulator: host code touched device memory at %p (a %zu-byte cudaMalloc at %p); "
                          "on a GPU this is an invalid access\n",
                          addr, d->size, static_cast<void*>(d->user));
        else if (a >= d->user + d->size)
            std::snprintf(msg, sizeof msg,
                          "x2l cuda emulator: %s%s read/write at %p, %zu bytes past the end of a %zu-byte cudaMalloc at %p\n",
                          g_kernel ? "kernel " : "", g_kernel ? g_kernel : "copy", addr,
                          static_cast<size_t>(a - (d->user + d->size)), d->size, static_cast<void*>(d->user));
        else
            std::snprintf(msg, sizeof msg, "x2l cuda emulator: %s%s read/write at %p, before a %zu-byte cudaMalloc at %p\n",
                          g_kernel ? "kernel " : "", g_kernel ? g_kernel : "copy", addr, d->size,
                          static_cast<void*>(d->user));
        ssize_t w = write(2, msg, std::strlen(msg));
        (void)w;
    }
    // Hand the fault to whoever was there before (Python's faulthandler prints the stack, then the
    // default action ends the process); returning re-executes the faulting access.
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
    (void)uctx;
}

void install_fault_handler() {
    static bool done = false;
    if (done) return;
    done = true;
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

}  // namespace

// ---------------------------------------------------------------- streams and events

}  // namespace x2l_emu

struct CUstream_st {
    bool legacy = false;
    bool blocking = true;  // synchronizes with the legacy stream
    std::deque<std::function<void()>> ops;
    uint64_t enqueued = 0, executed = 0;
    bool running = false;
    CUgraph_st* capture = nullptr;  // being captured: enqueued work goes there instead
    bool capture_invalid = false;
};

struct CUgraph_st {
    std::vector<std::function<void()>> ops;
};
struct CUgraphExec_st {
    std::vector<std::function<void()>> ops;
};

struct EventRecord {
    bool hit = false;
    double t_ms = 0;
};

struct CUevent_st {
    CUstream_st* stream = nullptr;
    uint64_t seq = 0;  // the stream's position right after the record
    std::shared_ptr<EventRecord> rec;
    bool timing = true;
    int queries_pending = 0;
};

namespace x2l_emu {
namespace {

CUstream_st g_legacy_stream{true, true, {}, 0, 0, false, nullptr, false};
std::set<CUstream_st*> g_streams;
std::set<CUevent_st*> g_events;
std::set<CUgraph_st*> g_graphs;
std::set<CUgraphExec_st*> g_graph_execs;
CUstream_st* g_capturing = nullptr;  // the stream being captured (one at a time here)

// A call a GPU refuses while a capture is active (global / thread-local mode): fails, and so does the capture.
cudaError_t capture_violation(const std::string& what) {
    if (!g_capturing) return cudaSuccess;
    g_capturing->capture_invalid = true;
    return fail(cudaErrorStreamCaptureUnsupported, what + " while a stream is being captured");
}
#define EMU_CAPTURE_CHECK(what) \
    if (cudaError_t ce_ = capture_violation(what)) return ce_

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

CUstream_st* resolve(cudaStream_t s) { return s ? s : &g_legacy_stream; }

void flush(CUstream_st* s, uint64_t upto) {
    if (s->executed >= upto) return;
    if (s->running) {
        fail_sticky("stream dependency cycle: a stream waits on its own later work");
        return;
    }
    s->running = true;
    DeviceAccess access;  // once per flush, not per op: the protection toggles cost a syscall per allocation
    while (s->executed < upto && !s->ops.empty()) {
        std::function<void()> op = std::move(s->ops.front());
        s->ops.pop_front();
        if (g_sticky == cudaSuccess) op();  // after a fault, later work is dropped (as on a GPU)
        ++s->executed;
    }
    s->running = false;
}
void flush_all(CUstream_st* s) { flush(s, s->enqueued); }

void flush_device() {
    flush_all(&g_legacy_stream);
    for (CUstream_st* s : g_streams) flush_all(s);
}

// Enqueue with the legacy stream's implicit ordering against blocking streams.
void enqueue(cudaStream_t stream, std::function<void()> fn) {
    CUstream_st* s = resolve(stream);
    if (s->capture) {  // recorded, not run; a graph launch enqueues it again
        if (!s->capture_invalid) s->capture->ops.push_back(std::move(fn));
        return;
    }
    if (s->legacy) {
        std::vector<std::pair<CUstream_st*, uint64_t>> deps;
        for (CUstream_st* b : g_streams)
            if (b->blocking && b->executed < b->enqueued) deps.emplace_back(b, b->enqueued);
        if (!deps.empty()) {
            fn = [deps, f = std::move(fn)] {
                for (const auto& d : deps)
                    if (g_streams.count(d.first)) flush(d.first, d.second);
                f();
            };
        }
    } else if (s->blocking && g_legacy_stream.executed < g_legacy_stream.enqueued) {
        const uint64_t upto = g_legacy_stream.enqueued;
        fn = [upto, f = std::move(fn)] {
            flush(&g_legacy_stream, upto);
            f();
        };
    }
    s->ops.push_back(std::move(fn));
    ++s->enqueued;
}

bool valid_stream(cudaStream_t s) { return !s || g_streams.count(s); }

}  // namespace

// ---------------------------------------------------------------- fibers

enum FiberState { kRunnable, kAtBlockBarrier, kAtWarpSync, kDone };

struct ThreadState {
    uint3 tid{0, 0, 0};
    int linear = 0;
    FiberState state = kRunnable;
    uint32_t warp_gen = 0;
    void* sp = nullptr;
    char* stack_lo = nullptr;  // usable stack [stack_lo, stack_lo + kStack)
#if !defined(__x86_64__)
    ucontext_t ctx;
#endif
};

ThreadState* g_current = nullptr;

namespace {

constexpr size_t kStack = 256 * 1024;
constexpr int kMaxThreads = 1024;

struct BlockRun {
    uint3 block{0, 0, 0};
    dim3 block_dim, grid_dim;
    int n_threads = 0;  // block_dim.x * y * z
    KernelBody* body = nullptr;
    std::vector<uint8_t> smem;
    uint64_t shfl[kMaxThreads / 32][2][32];
    std::string error;
};
BlockRun* g_run = nullptr;
std::vector<ThreadState> g_fibers;
void* g_sched_sp = nullptr;
#if !defined(__x86_64__)
ucontext_t g_sched_ctx;
#endif

}  // namespace
}  // namespace x2l_emu

#if defined(__x86_64__)
// void x2l_emu_switch(void** save_sp, void* next_sp): saves the callee-saved registers, MXCSR and
// the x87 control word on the current stack, stores the stack pointer, and resumes `next_sp`.
extern "C" void x2l_emu_switch(void** save_sp, void* next_sp);
asm(R"(
    .text
    .globl x2l_emu_switch
    .type x2l_emu_switch,@function
x2l_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size x2l_emu_switch, .-x2l_emu_switch
)");
#endif

namespace x2l_emu {
namespace {

[[noreturn]] void fiber_entry() {
    ThreadState* f = g_current;
    g_run->body->run();
    f->state = kDone;
#if defined(__x86_64__)
    x2l_emu_switch(&f->sp, g_sched_sp);
#else
    swapcontext(&f->ctx, &g_sched_ctx);
#endif
    __builtin_unreachable();
}

void fiber_start(ThreadState& f) {
    if (!f.stack_lo) {
        // [guard page][stack]: an overflow faults instead of corrupting the neighbour's stack.
        char* m = static_cast<char*>(mmap(nullptr, kStack + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "x2l cuda emulator: cannot map a fiber stack\n");
            std::abort();
        }
        mprotect(m, kPage, PROT_NONE);
        f.stack_lo = m + kPage;
    }
#if defined(__x86_64__)
    // Frame that x2l_emu_switch pops: [csr][r15 r14 r13 r12 rbx rbp][return address = fiber_entry].
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack_lo) + kStack) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 16);
    sp[0] = reinterpret_cast<uint64_t>(&fiber_entry);  // at entry rsp = top - 8, as after a call
    for (int i = 1; i <= 6; ++i) sp[-i] = 0;
    uint32_t csr[2] = {0, 0};
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    std::memcpy(&sp[-7], csr, 8);
    f.sp = &sp[-7];
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack_lo;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 0);
#endif
}

void resume(ThreadState& f) {
    g_current = &f;
#if defined(__x86_64__)
    x2l_emu_switch(&g_sched_sp, f.sp);
#else
    swapcontext(&g_sched_ctx, &f.ctx);
#endif
    g_current = nullptr;
}

void yield_to_scheduler() {
    ThreadState* f = g_current;
#if defined(__x86_64__)
    x2l_emu_switch(&f->sp, g_sched_sp);
#else
    swapcontext(&f->ctx, &g_sched_ctx);
#endif
    g_current = f;
}

// Runs one block to completion; false (with g_run->error) on a deadlock or a bad warp operation.
// Warp-major: each warp runs as far as it can (through its shuffles) before the next warp starts,
// so warps drift apart as much as the barriers allow; a missing __syncthreads() then shows up as a
// warp reading shared memory that a warp ahead of it has already overwritten (or not yet written).
bool run_block(bool reverse) {
    const int n = g_run->n_threads;
    for (int i = 0; i < n; ++i) {
        ThreadState& f = g_fibers[static_cast<size_t>(i)];
        const unsigned bx = g_run->block_dim.x, by = g_run->block_dim.y;
        f.linear = i;
        f.tid = uint3{static_cast<unsigned>(i) % bx, (static_cast<unsigned>(i) / bx) % by, static_cast<unsigned>(i) / (bx * by)};
        f.state = kRunnable;
        f.warp_gen = 0;
        fiber_start(f);
    }
    const int n_warps = (n + 31) / 32;
    for (;;) {
        for (int k = 0; k < n_warps; ++k) {
            const int w = reverse ? n_warps - 1 - k : k;
            const int lanes = std::min(32, n - 32 * w);
            for (;;) {
                for (int j = 0; j < lanes; ++j) {
                    ThreadState& f = g_fibers[static_cast<size_t>(32 * w + (reverse ? lanes - 1 - j : j))];
                    if (f.state == kRunnable) resume(f);
                    if (!g_run->error.empty()) return false;
                }
                int at_warp = 0, done = 0;
                for (int l = 0; l < lanes; ++l) {
                    const FiberState s = g_fibers[static_cast<size_t>(32 * w + l)].state;
                    at_warp += s == kAtWarpSync;
                    done += s == kDone;
                }
                if (at_warp == 0) break;  // every lane done or at the block barrier
                if (at_warp < lanes) {
                    g_run->error = done > 0 ? "a warp shuffle with a full mask was reached after some lanes of warp " +
                                                  std::to_string(w) + " had exited (undefined on a GPU)"
                                            : "deadlock in warp " + std::to_string(w) +
                                                  ": some lanes wait in __syncthreads() while others wait in a warp shuffle";
                    return false;
                }
                for (int l = 0; l < lanes; ++l) g_fibers[static_cast<size_t>(32 * w + l)].state = kRunnable;
            }
        }
        int n_done = 0;
        for (int i = 0; i < n; ++i) n_done += g_fibers[static_cast<size_t>(i)].state == kDone;
        if (n_done == n) return true;
        for (int i = 0; i < n; ++i)  // everyone else waits at the block barrier: release it
            if (g_fibers[static_cast<size_t>(i)].state == kAtBlockBarrier) g_fibers[static_cast<size_t>(i)].state = kRunnable;
    }
}

// ---------------------------------------------------------------- kernel execution

std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
uint64_t g_launches = 0;

size_t smem_optin() {  // sm_87 / sm_89 opt-in limits, or X2L_EMU_SMEM_OPTIN_KB
    if (cfg().smem_optin_kb > 0) return static_cast<size_t>(cfg().smem_optin_kb) * 1024;
    return cfg().integrated ? 166912 : 101376;
}

void execute_kernel(const std::string& name, dim3 grid, dim3 block, size_t smem, bool reverse,
                    const std::shared_ptr<KernelBody>& body) {
    DeviceAccess access;
    std::unique_ptr<BlockRun> run(new BlockRun);
    run->block_dim = block;
    run->grid_dim = grid;
    run->n_threads = static_cast<int>(block.x * block.y * block.z);
    run->body = body.get();
    if (g_fibers.size() < static_cast<size_t>(run->n_threads)) g_fibers.resize(static_cast<size_t>(run->n_threads));
    g_run = run.get();
    g_kernel = name.c_str();
    const uint64_t n_blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
    for (uint64_t i = 0; i < n_blocks; ++i) {
        run->block = uint3{static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                           static_cast<unsigned>(i / (static_cast<uint64_t>(grid.x) * grid.y))};
        run->smem.assign(smem + 256, 0xFF);  // NaN floats: uninitialized shared memory is not zero
        if (!run_block(reverse)) {
            fail_sticky("kernel " + name + ", block (" + std::to_string(run->block.x) + "," + std::to_string(run->block.y) +
                        "," + std::to_string(run->block.z) + "): " + run->error);
            break;
        }
    }
    g_run = nullptr;
    g_kernel = nullptr;
}

}  // namespace

const uint3& thread_idx() { return g_current->tid; }
const uint3& block_idx() { return g_run->block; }
const dim3& block_dim() { return g_run->block_dim; }
const dim3& grid_dim() { return g_run->grid_dim; }
void* dynamic_smem() {  // 256-byte aligned, as a GPU's (WMMA checks 32)
    const uintptr_t p = reinterpret_cast<uintptr_t>(g_run->smem.data());
    return reinterpret_cast<void*>((p + 255) & ~uintptr_t(255));
}

void device_fault(const char* what) { fail_sticky(what); }

void syncthreads() {
    g_current->state = kAtBlockBarrier;
    yield_to_scheduler();
}

uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask) {
    ThreadState* f = g_current;
    const int w = f->linear / 32, lane = f->linear % 32;
    const int n = g_run->n_threads;
    if (mask != 0xFFFFFFFFu || n < 32 * (w + 1)) {
        g_run->error = "a warp shuffle needs the full mask and a full warp here (mask " + std::to_string(mask) + ", " +
                       std::to_string(n) + " threads)";
        f->state = kDone;  // stops the block; run_block reports the error
        yield_to_scheduler();
        return 0;
    }
    const int buf = static_cast<int>(f->warp_gen & 1u);
    g_run->shfl[w][buf][lane] = bits;
    f->state = kAtWarpSync;
    yield_to_scheduler();
    ++f->warp_gen;
    return g_run->shfl[w][buf][(lane ^ lane_mask) & 31];
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
    EMU_LOCK;
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue, "unsupported function attribute");
    if (value < 0 || static_cast<size_t>(value) > smem_optin())
        return fail(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(value) + " above the device's opt-in limit");
    g_max_dynamic_smem[func] = value;
    return cudaSuccess;
}

void launch(const char* name, const void* func, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, KernelBody* raw) {
    EMU_LOCK;
    std::shared_ptr<KernelBody> body(raw);
    if (g_sticky != cudaSuccess) {
        g_last = g_sticky;
        return;
    }
    const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
    if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
        fail(cudaErrorInvalidConfiguration, std::string("launch of ") + name + ": grid (" + std::to_string(grid.x) + "," +
                                                std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block (" +
                                                std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                                                std::to_string(block.z) + ")");
        return;
    }
    auto it = g_max_dynamic_smem.find(func);
    const size_t limit = static_cast<size_t>(it == g_max_dynamic_smem.end() ? kSmemPerBlock : it->second);
    if (smem > limit) {
        fail(cudaErrorInvalidValue, std::string("launch of ") + name + ": " + std::to_string(smem) +
                                        " bytes of dynamic shared memory, limit " + std::to_string(limit));
        return;
    }
    if (!valid_stream(stream)) {
        fail(cudaErrorInvalidResourceHandle, "launch on a destroyed stream");
        return;
    }
    if (cfg().no_kernel_image) {
        fail(cudaErrorNoKernelImageForDevice, std::string("launch of ") + name + ": X2L_EMU_NO_KERNEL_IMAGE is set");
        return;
    }
    install_fault_handler();
    const int order = cfg().order;
    const bool reverse = order < 0 ? (g_launches & 1u) != 0 : order == 1;
    ++g_launches;
    std::string kname(name);
    enqueue(stream, [kname, grid, block, smem, reverse, body] { execute_kernel(kname, grid, block, smem, reverse, body); });
}

}  // namespace x2l_emu

using namespace x2l_emu;

// ---------------------------------------------------------------- devices

cudaError_t cudaGetDeviceCount(int* n) {
    EMU_LOCK;
    if (cfg().no_device) {
        *n = 0;
        return fail(cudaErrorNoDevice, "X2L_EMU_NO_DEVICE is set");
    }
    if (cfg().old_driver) {
        *n = 0;
        return fail(cudaErrorInsufficientDriver, "X2L_EMU_OLD_DRIVER is set");
    }
    *n = 1;
    return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* v) {
    *v = cfg().old_driver ? 12040 : 13000;
    return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
    *v = 13000;
    return cudaSuccess;
}

static int g_device = 0;

static cudaError_t check_device(int dev) {
    if (cfg().no_device) return fail(cudaErrorNoDevice, "X2L_EMU_NO_DEVICE is set");
    if (dev != 0) return fail(cudaErrorInvalidDevice, "the emulator has one device, 0");
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int* dev) {
    EMU_LOCK;
    *dev = g_device;
    return check_device(0);
}
cudaError_t cudaSetDevice(int dev) {
    EMU_LOCK;
    return check_device(dev);
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int dev) {
    EMU_LOCK;
    if (cudaError_t e = check_device(dev)) return e;
    std::memset(prop, 0, sizeof *prop);
    std::snprintf(prop->name, sizeof prop->name, "x2l-edge CUDA emulator (CPU%s)", cfg().integrated ? ", integrated" : "");
    prop->totalGlobalMem = cfg().mem_bytes;
    prop->sharedMemPerBlock = kSmemPerBlock;
    prop->multiProcessorCount = 4;
    prop->major = 8;
    prop->minor = cfg().integrated ? 7 : 9;
    prop->integrated = cfg().integrated;
    prop->canMapHostMemory = 1;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
    EMU_LOCK;
    if (cudaError_t e = check_device(dev)) return e;
    switch (attr) {
        case cudaDevAttrMultiProcessorCount: *value = 4; break;
        case cudaDevAttrIntegrated: *value = cfg().integrated; break;
        case cudaDevAttrCanMapHostMemory: *value = 1; break;
        case cudaDevAttrUnifiedAddressing: *value = 1; break;
        case cudaDevAttrComputeCapabilityMajor: *value = 8; break;
        case cudaDevAttrComputeCapabilityMinor: *value = cfg().integrated ? 7 : 9; break;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(smem_optin()); break;
        case cudaDevAttrHostRegisterReadOnlySupported: *value = cfg().readonly_register; break;
        default: return fail(cudaErrorInvalidValue, "device attribute not modelled by the emulator");
    }
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
    EMU_LOCK;
    EMU_CAPTURE_CHECK("cudaDeviceSynchronize");
    flush_device();
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    *total_bytes = cfg().mem_bytes;
    *free_bytes = cfg().mem_bytes - std::min(cfg().mem_bytes, g_dev_used);
    return cudaSuccess;
}

cudaError_t cudaGetLastError() {
    EMU_LOCK;
    const cudaError_t e = g_sticky != cudaSuccess ? g_sticky : g_last;
    g_last = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError() {
    EMU_LOCK;
    return g_sticky != cudaSuccess ? g_sticky : g_last;
}

const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
        case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
        case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
        case cudaErrorNotSupported: return "cudaErrorNotSupported";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
        case cudaErrorNotReady: return "cudaErrorNotReady";
        case cudaErrorHostMemoryAlreadyRegistered: return "cudaErrorHostMemoryAlreadyRegistered";
        case cudaErrorHostMemoryNotRegistered: return "cudaErrorHostMemoryNotRegistered";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
        case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    }
    return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t e) {
    static thread_local std::string s;
    EMU_LOCK;
    s = std::string(cudaGetErrorName(e)) + " [x2l cuda emulator";
    if (!g_detail.empty()) s += ": " + g_detail;
    s += "]";
    return s.c_str();
}

// ---------------------------------------------------------------- memory

cudaError_t cudaMalloc(void** p, size_t bytes) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    EMU_CAPTURE_CHECK("cudaMalloc");
    *p = nullptr;
    if (bytes > cfg().mem_bytes - std::min(cfg().mem_bytes, g_dev_used))
        return fail(cudaErrorMemoryAllocation, "cudaMalloc of " + std::to_string(bytes) + " bytes: the emulated device has " +
                                                   std::to_string(cfg().mem_bytes - g_dev_used) + " free (X2L_EMU_MEM_MB)");
    install_fault_handler();
    DeviceAlloc d;
    d.size = bytes;
    d.inner_len = round_up(std::max<size_t>(bytes, 1), kPage);
    d.map_len = d.inner_len + 2 * kPage;
    void* m = mmap(nullptr, d.map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return fail(cudaErrorMemoryAllocation, "mmap failed");
    d.map = static_cast<char*>(m);
    d.inner = d.map + kPage;
    d.user = d.inner + d.inner_len - round_up(std::max<size_t>(bytes, 1), 256);
    // Fresh device memory is not zero on a GPU: fill it with NaN bytes.
    mprotect(d.inner, d.inner_len, PROT_READ | PROT_WRITE);
    std::memset(d.inner, 0xFF, d.inner_len);
    if (g_access_depth == 0 && cfg().protect) protect_one(d, false);
    g_dev[reinterpret_cast<uintptr_t>(d.user)] = d;
    g_dev_used += bytes;
    *p = d.user;
    return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
    EMU_LOCK;
    EMU_CAPTURE_CHECK("cudaFree");
    if (!p) return cudaSuccess;
    flush_device();  // cudaFree synchronizes the device
    auto it = g_dev.find(reinterpret_cast<uintptr_t>(p));
    if (it == g_dev.end()) return fail(cudaErrorInvalidDevicePointer, "cudaFree of a pointer cudaMalloc did not return");
    munmap(it->second.map, it->second.map_len);
    g_dev_used -= it->second.size;
    g_dev.erase(it);
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

static cudaError_t add_pinned(void* p, size_t bytes, bool allocated, bool mapped) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = g_pinned.lower_bound(a);
    if (it != g_pinned.end() && it->first < a + bytes)
        return fail(cudaErrorHostMemoryAlreadyRegistered, "host range overlaps a pinned range");
    if (it != g_pinned.begin()) {
        --it;
        if (it->first + it->second.size > a) return fail(cudaErrorHostMemoryAlreadyRegistered, "host range overlaps a pinned range");
    }
    g_pinned[a] = PinnedRange{static_cast<char*>(p), bytes, allocated, mapped};
    return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned flags) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    *p = nullptr;
    EMU_CAPTURE_CHECK("cudaHostAlloc");
    void* m = std::aligned_alloc(kPage, round_up(std::max<size_t>(bytes, 1), kPage));
    if (!m) return fail(cudaErrorMemoryAllocation, "cudaHostAlloc");
    std::memset(m, 0xFF, round_up(std::max<size_t>(bytes, 1), kPage));
    if (cudaError_t e = add_pinned(m, bytes, true, (flags & cudaHostAllocMapped) != 0)) {
        std::free(m);
        return e;
    }
    *p = m;
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) { return cudaHostAlloc(p, bytes, cudaHostAllocDefault); }

cudaError_t cudaFreeHost(void* p) {
    EMU_LOCK;
    if (!p) return cudaSuccess;
    EMU_CAPTURE_CHECK("cudaFreeHost");
    flush_device();
    auto it = g_pinned.find(reinterpret_cast<uintptr_t>(p));
    if (it == g_pinned.end() || !it->second.allocated) return fail(cudaErrorInvalidValue, "cudaFreeHost of a pointer cudaHostAlloc did not return");
    g_pinned.erase(it);
    std::free(p);
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

// Whether every page of [p, p + bytes) is mapped writable (from /proc/self/maps).
static bool range_writable(const void* p, size_t bytes) {
    FILE* f = std::fopen("/proc/self/maps", "r");
    if (!f) return true;
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t end = a + bytes;
    char line[512];
    bool ok = true;
    while (a < end && std::fgets(line, sizeof line, f)) {
        unsigned long lo = 0, hi = 0;
        char perms[8] = {0};
        if (std::sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3) continue;
        if (a >= lo && a < hi) {
            if (perms[1] != 'w') ok = false;
            a = hi;
        }
    }
    std::fclose(f);
    return ok;
}

cudaError_t cudaHostRegister(void* p, size_t bytes, unsigned flags) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    if (!p || bytes == 0) return fail(cudaErrorInvalidValue, "cudaHostRegister of an empty range");
    EMU_CAPTURE_CHECK("cudaHostRegister");
    // As the driver: pages the process may not write (a read-only file mapping) register only with
    // cudaHostRegisterReadOnly, which needs cudaDevAttrHostRegisterReadOnlySupported.
    const bool writable = range_writable(p, bytes);
    if (flags & cudaHostRegisterReadOnly) {
        if (!cfg().readonly_register) return fail(cudaErrorNotSupported, "cudaHostRegisterReadOnly is not supported by this device");
    } else if (!writable) {
        return fail(cudaErrorInvalidValue, "cudaHostRegister of read-only pages without cudaHostRegisterReadOnly");
    }
    return add_pinned(p, bytes, false, (flags & cudaHostRegisterMapped) != 0);
}

cudaError_t cudaHostUnregister(void* p) {
    EMU_LOCK;
    EMU_CAPTURE_CHECK("cudaHostUnregister");
    flush_device();
    auto it = g_pinned.find(reinterpret_cast<uintptr_t>(p));
    if (it == g_pinned.end() || it->second.allocated)
        return fail(cudaErrorHostMemoryNotRegistered, "cudaHostUnregister of a pointer cudaHostRegister did not take");
    g_pinned.erase(it);
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

cudaError_t cudaHostGetDevicePointer(void** dev, void* host, unsigned flags) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    *dev = nullptr;
    if (flags != 0) return fail(cudaErrorInvalidValue, "cudaHostGetDevicePointer: flags must be 0");
    const PinnedRange* r = find_pinned(host);
    if (!r) return fail(cudaErrorInvalidValue, "cudaHostGetDevicePointer of memory that is not pinned");
    if (!r->mapped) return fail(cudaErrorInvalidValue, "cudaHostGetDevicePointer of pinned memory that was not mapped");
    *dev = host;  // unified addressing: the same address
    return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    std::memset(attr, 0, sizeof *attr);
    if (find_dev(p)) {
        attr->type = cudaMemoryTypeDevice;
        attr->devicePointer = const_cast<void*>(p);
    } else if (const PinnedRange* r = find_pinned(p)) {
        attr->type = cudaMemoryTypeHost;
        attr->hostPointer = const_cast<void*>(p);
        if (r->mapped) attr->devicePointer = const_cast<void*>(p);
    } else {
        attr->type = cudaMemoryTypeUnregistered;
    }
    return cudaSuccess;
}

// ---------------------------------------------------------------- copies

namespace {

enum class Side { kDevice, kPinned, kPageable };

Side side_of(const void* p, size_t bytes, std::string* err, const char* what) {
    if (const DeviceAlloc* d = find_dev(p)) {
        if (static_cast<const char*>(p) + bytes > d->user + d->size)
            *err = std::string(what) + ": " + std::to_string(bytes) + " bytes at offset " +
                   std::to_string(static_cast<const char*>(p) - d->user) + " leave the " + std::to_string(d->size) +
                   "-byte cudaMalloc";
        return Side::kDevice;
    }
    if (find_pinned(p, bytes)) return Side::kPinned;
    return Side::kPageable;
}

// Checks the copy against its declared kind; returns the error text, empty when fine.
std::string check_copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, Side* ds, Side* ss) {
    std::string err;
    *ds = side_of(dst, bytes, &err, "destination");
    *ss = side_of(src, bytes, &err, "source");
    if (!err.empty()) return err;
    const bool d_dev = *ds == Side::kDevice, s_dev = *ss == Side::kDevice;
    switch (kind) {
        case cudaMemcpyHostToDevice:
            if (!d_dev || s_dev) return "cudaMemcpyHostToDevice between the wrong kinds of memory";
            break;
        case cudaMemcpyDeviceToHost:
            if (d_dev || !s_dev) return "cudaMemcpyDeviceToHost between the wrong kinds of memory";
            break;
        case cudaMemcpyDeviceToDevice:
            if (!d_dev || !s_dev) return "cudaMemcpyDeviceToDevice between the wrong kinds of memory";
            break;
        case cudaMemcpyHostToHost:
        case cudaMemcpyDefault: break;
    }
    return "";
}

}  // namespace

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync on a destroyed stream");
    if (bytes == 0) return cudaSuccess;
    Side ds, ss;
    const std::string err = check_copy(dst, src, bytes, kind, &ds, &ss);
    if (!err.empty()) return fail(cudaErrorInvalidValue, "cudaMemcpyAsync: " + err);
    if (cfg().strict_pageable && stream != nullptr && ss == Side::kPageable)
        return fail(cudaErrorInvalidValue, "cudaMemcpyAsync from pageable memory on a stream (X2L_EMU_STRICT_PAGEABLE)");
    if (resolve(stream)->capture && (ss == Side::kPageable || ds == Side::kPageable))
        EMU_CAPTURE_CHECK("cudaMemcpyAsync to or from pageable memory");
    if (ss == Side::kPageable) {
        // From pageable memory the data is staged before the call returns.
        std::shared_ptr<std::vector<char>> staged(new std::vector<char>(static_cast<const char*>(src), static_cast<const char*>(src) + bytes));
        enqueue(stream, [dst, staged] {
            DeviceAccess a;
            std::memcpy(dst, staged->data(), staged->size());
        });
    } else {
        enqueue(stream, [dst, src, bytes] {
            DeviceAccess a;
            std::memcpy(dst, src, bytes);
        });
    }
    // Into pageable memory the copy is NOT complete on return here (the documentation promises it for
    // some drivers and copies only): it lands when the stream is synchronized, so host code that reads
    // the destination without a sync reads stale bytes (cudaMemcpy, the synchronous call, flushes).
    if (cfg().early_copies) flush_all(resolve(stream));
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    EMU_LOCK;
    EMU_CAPTURE_CHECK("cudaMemcpy (synchronous)");
    if (cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, nullptr)) return e;
    flush_all(&g_legacy_stream);
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaMemsetAsync on a destroyed stream");
    if (bytes == 0) return cudaSuccess;
    std::string err;
    if (side_of(p, bytes, &err, "cudaMemset") != Side::kDevice || !err.empty())
        return fail(cudaErrorInvalidValue, err.empty() ? "cudaMemset of memory that is not device memory" : err);
    enqueue(stream, [p, value, bytes] {
        DeviceAccess a;
        std::memset(p, value, bytes);
    });
    if (cfg().early_copies) flush_all(resolve(stream));
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

cudaError_t cudaMemset(void* p, int value, size_t bytes) {
    EMU_LOCK;
    EMU_CAPTURE_CHECK("cudaMemset (synchronous)");
    return cudaMemsetAsync(p, value, bytes, nullptr);
}

// ---------------------------------------------------------------- streams

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    CUstream_st* st = new CUstream_st;
    st->blocking = (flags & cudaStreamNonBlocking) == 0;
    g_streams.insert(st);
    *s = st;
    return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }

cudaError_t cudaStreamDestroy(cudaStream_t s) {
    EMU_LOCK;
    if (!s || !g_streams.count(s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy of an unknown stream");
    if (s->capture) return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamDestroy of a stream being captured");
    flush_all(s);  // queued work still completes
    for (CUevent_st* e : g_events)
        if (e->stream == s) e->stream = nullptr;  // completed now
    g_streams.erase(s);
    delete s;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    EMU_LOCK;
    EMU_CAPTURE_CHECK("cudaStreamSynchronize");
    if (!valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize of a destroyed stream");
    flush_all(resolve(s));
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    if (!valid_stream(s) || !e || !g_events.count(e) || flags != 0)
        return fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent: bad stream or event");
    if (resolve(s)->capture) EMU_CAPTURE_CHECK("cudaStreamWaitEvent on the capturing stream (not modelled by the emulator)");
    if (!e->rec || !e->stream) return cudaSuccess;  // never recorded, or already complete
    CUstream_st* src = e->stream;
    const uint64_t upto = e->seq;
    enqueue(s, [src, upto] {
        if (g_streams.count(src) || src == &g_legacy_stream) flush(src, upto);
    });
    return cudaSuccess;
}

// ---------------------------------------------------------------- events

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    CUevent_st* ev = new CUevent_st;
    ev->timing = (flags & cudaEventDisableTiming) == 0;
    g_events.insert(ev);
    *e = ev;
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }

cudaError_t cudaEventDestroy(cudaEvent_t e) {
    EMU_LOCK;
    if (!e || !g_events.erase(e)) return fail(cudaErrorInvalidResourceHandle, "cudaEventDestroy of an unknown event");
    delete e;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    if (!e || !g_events.count(e) || !valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord: bad event or stream");
    if (resolve(s)->capture) EMU_CAPTURE_CHECK("cudaEventRecord on the capturing stream (not modelled by the emulator)");
    std::shared_ptr<EventRecord> rec(new EventRecord);
    enqueue(s, [rec] {
        rec->hit = true;
        rec->t_ms = now_ms();
    });
    e->rec = rec;
    e->stream = resolve(s);
    e->seq = e->stream->enqueued;
    e->queries_pending = 0;
    return cudaSuccess;
}

static void complete_event(CUevent_st* e) {
    if (e->rec && e->stream && !e->rec->hit) flush(e->stream, e->seq);
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    EMU_LOCK;
    if (!e || !g_events.count(e)) return fail(cudaErrorInvalidResourceHandle, "cudaEventSynchronize of an unknown event");
    complete_event(e);
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t e) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    if (!e || !g_events.count(e)) return fail(cudaErrorInvalidResourceHandle, "cudaEventQuery of an unknown event");
    if (!e->rec || e->rec->hit || !e->stream) return cudaSuccess;
    // Not done yet: say so once, then let the work run (a GPU finishes eventually).
    if (e->queries_pending++ == 0) return cudaErrorNotReady;
    complete_event(e);
    EMU_STICKY_CHECK;
    return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    if (!start || !end || !g_events.count(start) || !g_events.count(end))
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: unknown event");
    if (!start->timing || !end->timing) return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event without timing");
    if (!start->rec || !end->rec) return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event never recorded");
    if (!start->rec->hit || !end->rec->hit) return cudaErrorNotReady;
    *ms = static_cast<float>(end->rec->t_ms - start->rec->t_ms);
    return cudaSuccess;
}

// ---------------------------------------------------------------- stream capture and graphs

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    if (!s || !g_streams.count(s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamBeginCapture: the legacy or an unknown stream");
    if (mode == cudaStreamCaptureModeRelaxed) return fail(cudaErrorInvalidValue, "cudaStreamBeginCapture: relaxed mode is not modelled");
    if (g_capturing) return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamBeginCapture: another capture is active (one at a time here)");
    if (cfg().refuse_capture) return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamBeginCapture: refused (X2L_EMU_REFUSE_CAPTURE)");
    s->capture = new CUgraph_st;
    s->capture_invalid = false;
    g_capturing = s;
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph) {
    EMU_LOCK;
    *graph = nullptr;
    if (!s || !g_streams.count(s) || !s->capture) return fail(cudaErrorInvalidValue, "cudaStreamEndCapture: the stream is not being captured");
    CUgraph_st* g = s->capture;
    const bool invalid = s->capture_invalid;
    s->capture = nullptr;
    s->capture_invalid = false;
    g_capturing = nullptr;
    if (invalid) {
        delete g;
        return fail(cudaErrorStreamCaptureInvalidated, "cudaStreamEndCapture: the capture was invalidated by an earlier call");
    }
    g_graphs.insert(g);
    *graph = g;
    return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
    EMU_LOCK;
    if (!valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamIsCapturing: unknown stream");
    const CUstream_st* st = resolve(s);
    *status = !st->capture ? cudaStreamCaptureStatusNone
                           : st->capture_invalid ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiateWithFlags(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    *exec = nullptr;
    if (!graph || !g_graphs.count(graph) || flags != 0) return fail(cudaErrorInvalidValue, "cudaGraphInstantiate: unknown graph or flags");
    CUgraphExec_st* x = new CUgraphExec_st;
    x->ops = graph->ops;
    g_graph_execs.insert(x);
    *exec = x;
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    EMU_LOCK;
    EMU_STICKY_CHECK;
    if (!exec || !g_graph_execs.count(exec)) return fail(cudaErrorInvalidResourceHandle, "cudaGraphLaunch: unknown graph exec");
    if (!valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaGraphLaunch on a destroyed stream");
    if (resolve(s)->capture) EMU_CAPTURE_CHECK("cudaGraphLaunch into a capture (not modelled by the emulator)");
    for (const std::function<void()>& op : exec->ops) enqueue(s, op);
    if (cfg().early_copies) flush_all(resolve(s));
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    EMU_LOCK;
    if (!graph || !g_graphs.erase(graph)) return fail(cudaErrorInvalidResourceHandle, "cudaGraphDestroy of an unknown graph");
    delete graph;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    EMU_LOCK;
    if (!exec || !g_graph_execs.erase(exec)) return fail(cudaErrorInvalidResourceHandle, "cudaGraphExecDestroy of an unknown graph exec");
    delete exec;
    return cudaSuccess;
}
