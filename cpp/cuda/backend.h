// CUDA backend: device discovery, memory/stream ownership and kernel launch wrappers.
//
// Plain C++ (no CUDA types), so any .cpp file may include it. The definitions live in cpp/cuda/*.cu
// and exist only when the build compiles the CUDA backend; only cpp/cuda/ and backends.cpp (and the
// test module's probes) call them.
//
// Conventions
// - Every pointer passed to a launch wrapper is device-accessible (cudaMalloc, or mapped pinned host
//   memory on integrated GPUs), except where a comment says "host".
// - `stream` is a cudaStream_t passed as void*; nullptr is the legacy default stream.
// - Launch wrappers only enqueue: they validate arguments on the host, launch, and check the launch.
//   Faults inside a kernel surface at the next synchronizing call.
// - Every CUDA failure throws x2l::Error carrying cudaGetErrorString's text (x2l::BudgetError, a
//   subclass, for out-of-memory).
// - Activations are f32, row-major, contiguous unless a stride is given. Weight/KV rows use the
//   ggml block layouts of quant.h.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/formats.h"

namespace x2l {

// ---------------------------------------------------------------- devices

// Number of CUDA devices the driver reports; 0 when the driver or device is missing (never throws).
int cuda_device_count();
// Why cudaGetDeviceCount found no device ("" when it succeeded): a driver too old for this build's
// runtime is reported here instead of looking like a machine without a GPU.
std::string cuda_probe_error();
// "" when a kernel of this build ran on device dev, otherwise why not (no kernel image for its
// architecture, a failed context...). Cached per device; never throws.
std::string cuda_device_unusable(int dev);
// Throws Error unless device `dev` exists and is usable (cuda_device_unusable): every executor's first check.
void cuda_require_device(int dev);

struct CudaDeviceInfo {
    std::string name;
    size_t total_mem = 0;        // bytes
    size_t free_mem = 0;         // bytes; MemAvailable of /proc/meminfo on integrated GPUs (shared DRAM)
    int cc_major = 0, cc_minor = 0;
    bool integrated = false;     // Jetson: host and device share one DRAM
    bool can_map_host_memory = false;
    int multiprocessors = 0;
};
CudaDeviceInfo cuda_device_info(int dev);

void cuda_set_device(int dev);
int cuda_get_device();
void cuda_device_synchronize();

// ---------------------------------------------------------------- memory (RAII, move-only)

// Device memory (cudaMalloc) of the device current at construction.
class CudaDeviceBuffer {
  public:
    CudaDeviceBuffer() = default;
    explicit CudaDeviceBuffer(size_t bytes);
    ~CudaDeviceBuffer();
    CudaDeviceBuffer(CudaDeviceBuffer&& o) noexcept;
    CudaDeviceBuffer& operator=(CudaDeviceBuffer&& o) noexcept;
    CudaDeviceBuffer(const CudaDeviceBuffer&) = delete;
    CudaDeviceBuffer& operator=(const CudaDeviceBuffer&) = delete;

    void* data() const { return ptr_; }
    size_t size() const { return bytes_; }
    // With a stream: enqueued on it (host memory must be pinned for the copy to overlap). Without:
    // complete on return (upload/zero), or after the legacy default stream's work (download) — work
    // on non-blocking streams is not ordered with these, synchronize those streams first.
    void upload(const void* host_src, size_t bytes, size_t offset = 0, void* stream = nullptr);
    void download(void* host_dst, size_t bytes, size_t offset = 0, void* stream = nullptr) const;
    void zero(void* stream = nullptr);

  private:
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};

// Page-locked host memory (cudaHostAlloc). mapped=true also maps it into the device address space:
// device_ptr() then lets kernels read it in place (zero-copy, the natural choice on Jetson where
// "host" and "device" memory are the same DRAM).
class CudaHostBuffer {
  public:
    CudaHostBuffer() = default;
    explicit CudaHostBuffer(size_t bytes, bool mapped = false);
    ~CudaHostBuffer();
    CudaHostBuffer(CudaHostBuffer&& o) noexcept;
    CudaHostBuffer& operator=(CudaHostBuffer&& o) noexcept;
    CudaHostBuffer(const CudaHostBuffer&) = delete;
    CudaHostBuffer& operator=(const CudaHostBuffer&) = delete;

    void* data() const { return host_; }
    void* device_ptr() const { return dev_; }  // nullptr unless mapped
    size_t size() const { return bytes_; }
    bool mapped() const { return dev_ != nullptr; }

  private:
    void* host_ = nullptr;
    void* dev_ = nullptr;
    size_t bytes_ = 0;
};

// Page-locks memory someone else owns (cudaHostRegister), so that copies from it are asynchronous DMA
// without a second, pinned copy of the data; mapped=true also maps it for the device (device_ptr()).
// Read-only file mappings are retried with cudaHostRegisterReadOnly. Throws Error when the driver
// refuses (callers then copy into a CudaHostBuffer). The memory must outlive the registration.
class CudaHostRegistration {
  public:
    CudaHostRegistration(const void* host, size_t bytes, bool mapped);
    ~CudaHostRegistration();
    CudaHostRegistration(const CudaHostRegistration&) = delete;
    CudaHostRegistration& operator=(const CudaHostRegistration&) = delete;
    void* device_ptr() const { return dev_; }  // nullptr unless mapped

  private:
    void* host_ = nullptr;
    void* dev_ = nullptr;
};

// The whole read-only file mapping that holds [p, p + bytes) (an index opened with mmap=True), page-
// locked once per process and shared by everyone who asks while it lives; *offset: p's offset in it.
// nullptr when p is not in such a mapping; Error when the driver refuses (e.g. a device without
// cudaDevAttrHostRegisterReadOnlySupported).
std::shared_ptr<CudaHostRegistration> cuda_register_file_mapping(const void* p, size_t bytes, bool mapped, size_t* offset);

// Device address of a byte inside mapped pinned memory (cudaHostGetDevicePointer).
void* cuda_mapped_device_ptr(const void* host_ptr);

// ---------------------------------------------------------------- streams and events

class CudaStream {
  public:
    // non_blocking: no implicit synchronization with the legacy default stream.
    explicit CudaStream(bool non_blocking = true);
    ~CudaStream();
    CudaStream(CudaStream&& o) noexcept;
    CudaStream& operator=(CudaStream&& o) noexcept;
    CudaStream(const CudaStream&) = delete;
    CudaStream& operator=(const CudaStream&) = delete;

    void* handle() const { return s_; }
    void synchronize() const;

  private:
    void* s_ = nullptr;
};

class CudaEvent {
  public:
    explicit CudaEvent(bool timing = false);
    ~CudaEvent();
    CudaEvent(CudaEvent&& o) noexcept;
    CudaEvent& operator=(CudaEvent&& o) noexcept;
    CudaEvent(const CudaEvent&) = delete;
    CudaEvent& operator=(const CudaEvent&) = delete;

    void* handle() const { return e_; }
    void record(void* stream);
    void wait_in(void* stream) const;  // `stream` waits (on the device) until this event completes
    void synchronize() const;          // the host waits
    bool done() const;
    float elapsed_ms_since(const CudaEvent& start) const;  // both created with timing=true

  private:
    void* e_ = nullptr;
};

// Host-to-device copies of pageable data without the implicit synchronization a pageable
// cudaMemcpyAsync does: the bytes are copied into a pinned buffer (bump-allocated, reused once the
// copies from it have landed) and DMA'd from there on the stream. The source may change on return.
// One stream per object (its copies are ordered on it); not for use during stream capture.
class CudaStaging {
  public:
    CudaStaging();
    ~CudaStaging();
    CudaStaging(CudaStaging&&) noexcept;
    CudaStaging& operator=(CudaStaging&&) noexcept;
    void upload(void* dev_dst, const void* host_src, size_t bytes, void* stream);

  private:
    std::unique_ptr<CudaHostBuffer> buf_;
    std::unique_ptr<CudaEvent> landed_;  // recorded after the latest copy from buf_
    size_t used_ = 0;
    void* stream_ = nullptr;
};

// A CUDA graph: the work one stream's callback enqueues, captured once (nothing runs then) and
// replayed by launch() at the cost of one launch. Kernel arguments and copy addresses are frozen at
// capture; what must change from one replay to the next has to be read from memory (device buffers,
// or pinned host memory that a captured copy reads). Work that cannot be captured (a copy from
// pageable memory, a synchronization, an allocation) makes capture() throw Error, after which the
// stream works as before.
class CudaGraph {
  public:
    CudaGraph() = default;
    ~CudaGraph();
    CudaGraph(const CudaGraph&) = delete;
    CudaGraph& operator=(const CudaGraph&) = delete;

    // Captures what enqueue() puts on `stream` and instantiates it (replacing what this held).
    void capture(void* stream, const std::function<void()>& enqueue);
    void launch(void* stream) const;
    bool ready() const { return exec_ != nullptr; }
    void reset();

  private:
    void* graph_ = nullptr;
    void* exec_ = nullptr;
};

// Asynchronous host-to-device copy on `stream` (host memory pinned for it to overlap).
void cuda_copy_h2d_async(void* dst, const void* src, size_t bytes, void* stream);
void cuda_copy_d2h_async(void* dst, const void* src, size_t bytes, void* stream);
void cuda_copy_d2d_async(void* dst, const void* src, size_t bytes, void* stream);

// Layer-pipelined upload of per-layer data (the L-KV reload of DESIGN §1/§2): layer l+1 is copied on
// a dedicated copy stream into one of n_slots device slots while the compute stream runs layer l.
// Per slot: a "ready" event (copies landed, compute waits on it) and a "released" event (compute done
// reading, the next copy into that slot waits on it). Layer l uses slot l % n_slots; begin() throws
// if that slot's previous layer was not released (with one slot: stage l+1 after release(l), no overlap).
//
//   pipe.begin(0); p0 = pipe.stage(src0, n0); pipe.end();
//   for l: { pipe.begin(l+1); ...stage...; pipe.end();        // overlaps with layer l below
//            pipe.wait_ready(l, compute); run layer l on compute; pipe.release(l, compute); }
//
// Sources must be pinned (CudaHostBuffer) for the copies to be asynchronous.
// zero_copy (integrated GPUs): no slots and no copies; stage() returns the device address of the
// mapped pinned source itself, and the other calls do nothing. The source must then be a
// CudaHostBuffer allocated with mapped=true.
class CudaLayerPipeline {
  public:
    CudaLayerPipeline(size_t slot_bytes, int n_slots, bool zero_copy);
    ~CudaLayerPipeline();
    CudaLayerPipeline(const CudaLayerPipeline&) = delete;
    CudaLayerPipeline& operator=(const CudaLayerPipeline&) = delete;

    bool zero_copy() const { return zero_copy_; }
    void* copy_stream() const { return copy_stream_.handle(); }
    int n_slots() const { return static_cast<int>(slots_.size()); }
    size_t slot_bytes() const { return slot_bytes_; }
    // Offsets inside a slot are multiples of 256 bytes: a stage() of `bytes` takes at most aligned(bytes).
    static size_t aligned(size_t bytes) { return (bytes + 255) & ~size_t(255); }

    void begin(int layer);
    // Enqueue a copy of `bytes` from (pinned) host memory; returns where the data will be on the
    // device. Offsets inside a slot are 256-byte aligned. Throws when the slot is full.
    void* stage(const void* host_src, size_t bytes);
    // Room for `bytes` in the open slot (256-byte aligned) that the caller fills itself with work
    // enqueued on copy_stream() before end() (e.g. a kernel writing a transformed copy). Not zero_copy.
    void* take(size_t bytes);
    void end();
    void wait_ready(int layer, void* compute_stream);
    void release(int layer, void* compute_stream);
    // Forget every slot's layer (start of a new pass). The compute stream must be done with them.
    void reset();

  private:
    struct Slot {
        CudaDeviceBuffer buf;
        CudaEvent ready, released;
        int layer = -1;
        bool released_recorded = false;
    };
    bool zero_copy_;
    size_t slot_bytes_;
    CudaStream copy_stream_;
    std::vector<Slot> slots_;
    int open_ = -1;       // slot being staged, -1 outside begin()/end()
    size_t offset_ = 0;   // bytes used in the open slot
};

// ---------------------------------------------------------------- kernels: matmul and friends

// Formats the kernels read: F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K.
bool cuda_matmul_supported(DType t);
// Bytes of a row of n values of type t as the kernels read it (ggml layout); 0 if unsupported.
size_t cuda_row_bytes(DType t, int64_t n);

// y[n_tokens, rows] = x[n_tokens, n] · W^T, W = rows × cuda_row_bytes(w_type, n) bytes, dequantized in
// the kernel. n: a multiple of the block size (4 for F32/F16). x 16-byte aligned.
// Auto: n_tokens <= 8 uses a warp-per-row matvec (decode); up to 63 a shared-memory tiled f32 kernel;
// from 64 (prefill) the same tiles in f16 on tensor cores (WMMA, f32 accumulation). The others force
// one tiled variant whatever n_tokens (tests, benchmarks).
enum class MatmulKernel : int { Auto = 0, TiledF32 = 1, TensorCore = 2 };
void cuda_matmul(DType w_type, const void* w, int64_t rows, int64_t n, const float* x, int64_t n_tokens,
                 float* y, void* stream, MatmulKernel kernel = MatmulKernel::Auto);

// dst[i, :] = dequantize(table row ids[i]) for i < n_ids; dst [n_ids, n]. Ids outside
// [0, n_table_rows) give zero rows. (Embedding lookup; also the dequantize test path.)
void cuda_get_rows(DType type, const void* table, int64_t n_table_rows, int64_t n, const int32_t* ids,
                   int64_t n_ids, float* dst, void* stream);

// ---------------------------------------------------------------- kernels: elementwise and norms

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w; x, y: [n_rows, n]; w: [n] or nullptr (= 1).
void cuda_rms_norm(const float* x, const float* w, float* y, int64_t n_rows, int64_t n, float eps, void* stream);
// y = (x - mean) / sqrt(var + eps) * w + b per row; w, b may be nullptr.
void cuda_layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n_rows, int64_t n,
                     float eps, void* stream);

// Rotary embedding on x[n_tokens, n_head, head_dim] (token stride tok_stride floats, heads contiguous);
// y has the same layout and may equal x. The first n_rot dims of each head rotate by
// pos[t] * freq_scale * freq_base^(-2i/n_rot); the rest are copied. mode 0 (NORM): pairs (2i, 2i+1),
// mode 2 (NEOX): pairs (i, i + n_rot/2) — ggml's mode values. pos: device int32 [n_tokens].
enum class RopeMode : int { Norm = 0, Neox = 2 };
void cuda_rope(const float* x, float* y, const int32_t* pos, int64_t n_tokens, int64_t n_head, int64_t head_dim,
               int64_t tok_stride, int n_rot, float freq_base, float freq_scale, RopeMode mode, void* stream);

// Rotary embedding whose pairs take their angle from different position axes (M-RoPE of Qwen2-VL's LLM,
// the 2-D rotary of its ViT): in every head of x [n_tokens, n_head, head_dim] (tokens tok_stride floats
// apart; y alike, may equal x) the NEOX pair (i, i + head_dim/2) rotates by pos[axis[i]][t] * freq[i].
// freq, axis: host, [head_dim / 2] each, axis < n_axes (<= 4). pos: device int32, row a at
// pos + a * pos_axis_stride (stride 0: every axis reads one row, a text token's position).
void cuda_rope_axes(const float* x, float* y, const int32_t* pos, int64_t pos_axis_stride, int64_t n_tokens,
                    int64_t n_head, int64_t head_dim, int64_t tok_stride, const float* freq, const uint8_t* axis,
                    int n_axes, void* stream);

// Rotates rows of post-RoPE keys by `delta` more positions (X²L dense positions: a chunk whose place in
// the mixed cache moved). n_rows rows of `type` (F32, F16, Q8_0, Q4_0), row_stride bytes apart, each one
// head of head_dim values; quantized rows are dequantized, rotated in f32 and quantized again with the
// CPU's rules. Same pairs and frequencies as cuda_rope. dst may equal src.
void cuda_rerotate_keys(DType type, const void* src, void* dst, int64_t n_rows, size_t row_stride, int head_dim, int n_rot,
                        float freq_base, RopeMode mode, int32_t delta, void* stream);

// y[r, :] = softmax(x[r, :] * scale); x, y: [n_rows, n].
void cuda_softmax(const float* x, float* y, int64_t n_rows, int64_t n, float scale, void* stream);
// y = silu(gate) * up (SwiGLU); all [n].
void cuda_swiglu(const float* gate, const float* up, float* y, int64_t n, void* stream);
// y = gelu(x): the exact erf form, the tanh approximation, or CLIP's quick_gelu x * sigmoid(1.702 x).
enum class GeluMode : int { Erf = 0, Tanh = 1, Quick = 2 };
void cuda_gelu(const float* x, float* y, int64_t n, GeluMode mode, void* stream);
// Spatial pooling of n_frames square grids of channel vectors: x [n_frames, grid, grid, channels] ->
// y [n_frames, out_grid, out_grid, channels]. Avg: mean of stride x stride blocks (out_grid * stride
// <= grid); Bilinear: resize to out_grid (torch's bilinear, align_corners=False; stride unused).
enum class PoolKind : int { Avg = 0, Bilinear = 1 };
void cuda_pool2d(const float* x, float* y, int64_t n_frames, int grid, int out_grid, int64_t channels, PoolKind kind,
                 int stride, void* stream);
// Idefics3's pixel shuffle: x [n_frames, side, side, channels] -> y [n_frames, side/scale, side/scale,
// scale * scale * channels]; output token (i, j) holds input tokens (i*scale + dy, j*scale + dx), dy-major.
void cuda_pixel_shuffle(const float* x, float* y, int64_t n_frames, int side, int scale, int64_t channels, void* stream);
// y[i] = a[i] + b[i % b_period] / a[i] * b[i % b_period]; b_period = n for same-shape operands,
// the row length for a broadcast bias/scale.
void cuda_add(const float* a, const float* b, float* y, int64_t n, int64_t b_period, void* stream);
void cuda_mul(const float* a, const float* b, float* y, int64_t n, int64_t b_period, void* stream);
// dst[ids[i], :] = src[i, :] for i < n_ids: src [n_ids, n], dst [n_dst_rows, n] (f32); ids (device)
// outside [0, n_dst_rows) are skipped. The scatter after a matmul over gathered rows (cuda_get_rows).
void cuda_set_rows(const float* src, const int32_t* ids, int64_t n_ids, int64_t n, float* dst, int64_t n_dst_rows,
                   void* stream);
// dst[i, :] = src[ids[i], :] for i < n_ids: rows of row_bytes bytes (a multiple of 4) of any type, copied
// as they are; ids (device) outside [0, n_src_rows) give zero rows. (The X²L prefill fetches only the
// K/V rows it keeps.)
void cuda_gather_rows(const void* src, int64_t n_src_rows, size_t row_bytes, const int32_t* ids, int64_t n_ids, void* dst,
                      void* stream);
// y[i] = f16(x[i]) (round to nearest even): storing new K/V rows into an f16 cache.
void cuda_f32_to_f16(const float* x, void* y, int64_t n, void* stream);
// The same into row *row (device int32, read when the kernel runs) of y [.., row_elems] halves: the
// KV append of a replayed CUDA graph, whose row changes from one replay to the next.
void cuda_f32_to_f16_at(const float* x, void* y, int64_t n, const int32_t* row, int64_t row_elems, void* stream);

// ---------------------------------------------------------------- kernels: attention over KV segments

// One piece of the KV sequence (sink, a chunk's L-KV or H-KV, the new tokens...). Row (token j, kv
// head h) of K starts at k + j*k_tok_stride + h*k_head_stride bytes and holds head_dim values of
// k_type (F32, F16, Q8_0 or Q4_0); same for V. Keys are post-RoPE. Token-major
// [n_tokens, n_kv_head, head_dim] and head-major [n_kv_head, n_tokens, head_dim] are both strides.
struct CudaKVSegment {
    const void* k = nullptr;
    const void* v = nullptr;
    int64_t k_tok_stride = 0, k_head_stride = 0;  // bytes
    int64_t v_tok_stride = 0, v_head_stride = 0;  // bytes
    int64_t n_tokens = 0;
    uint32_t k_type = 1, v_type = 1;              // DType ids (default F16)
};

bool cuda_kv_type_supported(DType t);

// Owns the device copy of a list of segments in temporal order (kernels read descriptors from device
// memory, so a mixed cache of hundreds of chunks costs no launch-parameter space). Build it once per
// question per layer; assign() validates against head_dim and uploads stream-ordered on `stream`.
class CudaSegmentTable {
  public:
    void assign(const std::vector<CudaKVSegment>& segs, int head_dim, void* stream);
    // Allocates room for n segments now (assign() then reuses it without a device allocation).
    void reserve(int n);
    const CudaKVSegment* device_data() const { return static_cast<const CudaKVSegment*>(dev_.data()); }
    int size() const { return static_cast<int>(host_.size()); }
    int64_t n_kv() const { return n_kv_; }
    const std::vector<CudaKVSegment>& host() const { return host_; }

  private:
    std::vector<CudaKVSegment> host_;
    CudaDeviceBuffer dev_;
    CudaStaging staging_;              // the upload goes through pinned memory (no implicit sync)
    void* uploaded_on_ = nullptr;      // the stream of the last upload; unchanged tables are not sent again
    bool uploaded_ = false;
    int64_t n_kv_ = 0;
};

struct CudaAttentionParams {
    const float* q = nullptr;       // [n_q, n_head, head_dim] post-RoPE; tokens q_tok_stride floats apart
    int64_t q_tok_stride = 0;       // 0 = n_head * head_dim
    float* out = nullptr;           // [n_q, n_head, head_dim]
    int64_t out_tok_stride = 0;     // 0 = n_head * head_dim
    int n_q = 0, n_head = 0, n_kv_head = 0, head_dim = 0;  // head_dim <= 256; n_head % n_kv_head == 0
    const CudaKVSegment* segments = nullptr;  // device-accessible (CudaSegmentTable::device_data())
    int n_segments = 0;
    int64_t n_kv = 0;               // total tokens of the segments
    float scale = 0.f;              // 0 = 1/sqrt(head_dim)
    // The new tokens are the last n_q entries of the KV sequence: query t sits at kv index
    // n_kv - n_q + t. causal: it sees kv indices <= that; window > 0: only the last `window` of them.
    bool causal = true;
    int window = 0;
    // Split-KV (flash-decoding): n_splits blocks share one row's keys and a second kernel merges their
    // partial softmax states. 0 = choose from the device size; 1 = off. Needs workspace.
    int n_splits = 0;
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
    // [n_q, n_head] or nullptr: each row's log-sum-exp of its scaled scores in base 2
    // (max + log2(sum), scores already multiplied by scale * log2(e)), for cuda_attention_votes.
    // Forces n_splits = 1. Rows t < lse_from need none (they do not vote): the tensor-core path, whose
    // log-sum-exp comes from a second f32 pass over the rows, skips them; the f32 kernel writes every row.
    float* lse = nullptr;
    int lse_from = 0;
    // Replayed CUDA graphs (decode): the last segment (the cache's own entries) holds *own_len entries
    // (device int32, read when the kernel runs) instead of its n_tokens, at most own_max; n_kv counts
    // own_max for it, so the split layout chosen here suits every length up to that.
    const int32_t* own_len = nullptr;
    int64_t own_max = 0;
    // n_batch independent problems of this shape in one launch (the vision tower's frames): problem b
    // reads q + b * q_batch_stride floats and its own n_segments segments at segments + b * n_segments
    // (n_kv tokens each), and writes out + b * out_batch_stride. n_batch > 1: no splits, lse or own_len.
    int n_batch = 1;
    int64_t q_batch_stride = 0, out_batch_stride = 0;
    // Auto: tensor cores (f16 Q, K, V and probabilities, f32 sums) when a KV head has >= 64 query rows
    // (n_q * n_head / n_kv_head: the prefill, the vision tower) and head_dim <= 128, with lse (the X²L
    // votes) from a second pass on f32 scores; the f32 kernel otherwise (decode). The others force one
    // (TensorCore needs head_dim <= 128 and no own_len, and writes lse from its own f16-operand scores).
    enum class Kernel : int { Auto = 0, F32 = 1, TensorCore = 2 };
    Kernel kernel = Kernel::Auto;
};

// Attention observation (X²L compression): for the attention call that wrote `lse` with these q rows,
// adds to votes[kv_head * votes_stride + e] the softmax probability that each query row t in
// [obs_from, n_q) gave to entry e of `own`, summed over the KV head's query heads (max_pool: keeps the
// largest of those probabilities and the vote already there instead). `own` holds the
// last n_own kv entries of that call (the cache's own entries; query t is entry n_own - n_q + t and
// sees entries <= that); only its K side is read. Same q layout and scale as CudaAttentionParams.
void cuda_attention_votes(const float* q, int64_t q_tok_stride, const float* lse, int n_q, int n_head, int n_kv_head,
                          int head_dim, float scale, const CudaKVSegment& own, int64_t n_own, int obs_from, float* votes,
                          int64_t votes_stride, void* stream, bool max_pool = false);

// Workspace needed for a given split count (0 for n_splits <= 1).
size_t cuda_attention_workspace_bytes(int n_q, int n_head, int head_dim, int n_splits);
// Online-softmax attention over the segments; convenient overload takes the table.
void cuda_attention(const CudaAttentionParams& p, void* stream);
void cuda_attention(CudaAttentionParams p, const CudaSegmentTable& table, void* stream);

}  // namespace x2l
