// x2l_edge._testing, CUDA part: one self-test entry per kernel of the CUDA backend (numpy in, run on
// the current GPU, numpy out) so that pytest can compare every op with a reference, and the speed
// probes bench/gpu/bench_cuda.py times. Compiled only into a test build that has the CUDA backend (or
// its emulator); cuda_stubs.cpp registers the same names otherwise.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/common.h"
#include "cuda/backend.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using F32Array = nb::ndarray<nb::numpy, const float, nb::c_contig, nb::device::cpu>;
using U8Array = nb::ndarray<nb::numpy, const uint8_t, nb::c_contig, nb::device::cpu>;
using I32Array = nb::ndarray<nb::numpy, const int32_t, nb::c_contig, nb::device::cpu>;
using OutF32 = nb::ndarray<nb::numpy, float>;

OutF32 make_out(std::vector<float>&& v, std::vector<size_t> shape) {
    auto* heap = new std::vector<float>(std::move(v));
    nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    return OutF32(heap->data(), shape.size(), shape.data(), owner);
}

size_t numel(const std::vector<size_t>& shape) {
    size_t n = 1;
    for (size_t s : shape) n *= s;
    return n;
}

template <typename A>
std::vector<size_t> shape_of(const A& a) {
    std::vector<size_t> s(a.ndim());
    for (size_t i = 0; i < a.ndim(); ++i) s[i] = a.shape(i);
    return s;
}

// Device buffer of exactly `bytes` (a few bytes when empty, so that kernels get a valid pointer).
x2l::CudaDeviceBuffer device_buffer(size_t bytes) { return x2l::CudaDeviceBuffer(bytes ? bytes : 16); }

// Device copy of a host array (RAII).
x2l::CudaDeviceBuffer to_device(const void* p, size_t bytes) {
    x2l::CudaDeviceBuffer b = device_buffer(bytes);
    if (bytes) b.upload(p, bytes);
    return b;
}

std::vector<float> from_device(const x2l::CudaDeviceBuffer& b, size_t n) {
    std::vector<float> out(n);
    if (n) b.download(out.data(), n * sizeof(float));
    return out;
}

// Runs `launch(stream)` on a fresh stream and waits, so kernel faults surface here as x2l::Error.
template <typename Fn>
void run_sync(Fn&& launch) {
    x2l::CudaStream s;
    launch(s.handle());
    s.synchronize();
}

void require_device() {
    if (x2l::cuda_device_count() == 0) throw x2l::Error("no CUDA device available");
}

x2l::DType cuda_type(uint32_t type_id) {
    x2l::DType t = static_cast<x2l::DType>(type_id);
    if (!x2l::cuda_matmul_supported(t)) throw x2l::Error("type id " + std::to_string(type_id) + " not supported by the CUDA kernels");
    return t;
}

x2l::MatmulKernel matmul_kernel(const std::string& kernel) {
    if (kernel == "auto") return x2l::MatmulKernel::Auto;
    if (kernel == "f32") return x2l::MatmulKernel::TiledF32;
    if (kernel == "tensor_core") return x2l::MatmulKernel::TensorCore;
    throw x2l::Error("kernel must be 'auto', 'f32' or 'tensor_core'");
}

x2l::CudaAttentionParams::Kernel attention_kernel(const std::string& kernel) {
    using AK = x2l::CudaAttentionParams::Kernel;
    if (kernel == "auto") return AK::Auto;
    if (kernel == "f32") return AK::F32;
    if (kernel == "tensor_core") return AK::TensorCore;
    throw x2l::Error("kernel must be 'auto', 'f32' or 'tensor_core'");
}

OutF32 op_matmul(uint32_t type_id, U8Array w, int64_t rows, int64_t n, F32Array x, const std::string& kernel) {
    require_device();
    const x2l::MatmulKernel k = matmul_kernel(kernel);
    const x2l::DType t = cuda_type(type_id);
    if (x.ndim() != 2 || static_cast<int64_t>(x.shape(1)) != n) throw x2l::Error("x must have shape [T, n]");
    const size_t rb = x2l::cuda_row_bytes(t, n);
    if (rb == 0 || w.nbytes() != rb * static_cast<size_t>(rows)) throw x2l::Error("w must hold rows * row_bytes(n) bytes");
    const int64_t T = static_cast<int64_t>(x.shape(0));
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        auto dw = to_device(w.data(), w.nbytes());
        auto dx = to_device(x.data(), x.nbytes());
        x2l::CudaDeviceBuffer dy = device_buffer(static_cast<size_t>(T * rows) * sizeof(float));
        run_sync([&](void* s) {
            x2l::cuda_matmul(t, dw.data(), rows, n, static_cast<const float*>(dx.data()), T, static_cast<float*>(dy.data()), s, k);
        });
        out = from_device(dy, static_cast<size_t>(T * rows));
    }
    return make_out(std::move(out), {static_cast<size_t>(T), static_cast<size_t>(rows)});
}

OutF32 op_get_rows(uint32_t type_id, U8Array table, int64_t n_rows, int64_t n, I32Array ids) {
    require_device();
    const x2l::DType t = cuda_type(type_id);
    const size_t rb = x2l::cuda_row_bytes(t, n);
    if (rb == 0 || table.nbytes() != rb * static_cast<size_t>(n_rows)) throw x2l::Error("table must hold n_rows * row_bytes(n) bytes");
    const int64_t n_ids = static_cast<int64_t>(ids.size());
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        auto dt = to_device(table.data(), table.nbytes());
        auto di = to_device(ids.data(), ids.nbytes());
        x2l::CudaDeviceBuffer dy = device_buffer(static_cast<size_t>(n_ids * n) * sizeof(float));
        run_sync([&](void* s) {
            x2l::cuda_get_rows(t, dt.data(), n_rows, n, static_cast<const int32_t*>(di.data()), n_ids,
                               static_cast<float*>(dy.data()), s);
        });
        out = from_device(dy, static_cast<size_t>(n_ids * n));
    }
    return make_out(std::move(out), {static_cast<size_t>(n_ids), static_cast<size_t>(n)});
}

// Row-wise ops take x [..., n] and treat the leading dims as rows.
void rows_of(const F32Array& x, int64_t& n_rows, int64_t& n) {
    if (x.ndim() < 1 || x.shape(x.ndim() - 1) == 0) throw x2l::Error("x must have a non-empty last dimension");
    n = static_cast<int64_t>(x.shape(x.ndim() - 1));
    n_rows = static_cast<int64_t>(x.size()) / n;
}

void check_vec(const std::optional<F32Array>& v, int64_t n, const char* what) {
    if (v && static_cast<int64_t>(v->size()) != n) throw x2l::Error(std::string(what) + " must have n elements");
}

OutF32 op_norm(F32Array x, std::optional<F32Array> w, std::optional<F32Array> b, float eps, bool layer) {
    require_device();
    int64_t n_rows, n;
    rows_of(x, n_rows, n);
    check_vec(w, n, "w");
    check_vec(b, n, "b");
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        auto dx = to_device(x.data(), x.nbytes());
        x2l::CudaDeviceBuffer dw, db;
        if (w) dw = to_device(w->data(), w->nbytes());
        if (b) db = to_device(b->data(), b->nbytes());
        x2l::CudaDeviceBuffer dy = device_buffer(x.nbytes());
        const float* pw = w ? static_cast<const float*>(dw.data()) : nullptr;
        const float* pb = b ? static_cast<const float*>(db.data()) : nullptr;
        run_sync([&](void* s) {
            if (layer)
                x2l::cuda_layer_norm(static_cast<const float*>(dx.data()), pw, pb, static_cast<float*>(dy.data()), n_rows, n, eps, s);
            else
                x2l::cuda_rms_norm(static_cast<const float*>(dx.data()), pw, static_cast<float*>(dy.data()), n_rows, n, eps, s);
        });
        out = from_device(dy, x.size());
    }
    return make_out(std::move(out), shape_of(x));
}

// x [T, n_head, head_dim] and pos uploaded, `rope(dx, dy_or_dx, dpos, stream)` enqueued, the result downloaded.
template <class Rope>
OutF32 rope_probe(const F32Array& x, const void* pos, size_t pos_bytes, bool in_place, Rope rope) {
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        auto dx = to_device(x.data(), x.nbytes());
        auto dp = to_device(pos, pos_bytes);
        x2l::CudaDeviceBuffer dy;
        if (!in_place) dy = device_buffer(x.nbytes());
        float* py = in_place ? static_cast<float*>(dx.data()) : static_cast<float*>(dy.data());
        run_sync([&](void* s) { rope(static_cast<const float*>(dx.data()), py, static_cast<const int32_t*>(dp.data()), s); });
        out = from_device(in_place ? dx : dy, x.size());
    }
    return make_out(std::move(out), shape_of(x));
}

OutF32 op_rope(F32Array x, I32Array pos, int n_rot, float freq_base, float freq_scale, bool neox, bool in_place) {
    require_device();
    if (x.ndim() != 3) throw x2l::Error("x must have shape [T, n_head, head_dim]");
    const int64_t T = static_cast<int64_t>(x.shape(0)), H = static_cast<int64_t>(x.shape(1)), D = static_cast<int64_t>(x.shape(2));
    if (static_cast<int64_t>(pos.size()) != T) throw x2l::Error("pos must have T entries");
    return rope_probe(x, pos.data(), pos.nbytes(), in_place, [&](const float* dx, float* dy, const int32_t* dp, void* s) {
        x2l::cuda_rope(dx, dy, dp, T, H, D, H * D, n_rot, freq_base, freq_scale,
                       neox ? x2l::RopeMode::Neox : x2l::RopeMode::Norm, s);
    });
}

OutF32 op_rope_axes(F32Array x, I32Array pos, F32Array freq, U8Array axis, bool in_place, bool one_row) {
    require_device();
    if (x.ndim() != 3) throw x2l::Error("x must have shape [T, n_head, head_dim]");
    const int64_t T = static_cast<int64_t>(x.shape(0)), H = static_cast<int64_t>(x.shape(1)), D = static_cast<int64_t>(x.shape(2));
    if (pos.ndim() != 2 || static_cast<int64_t>(pos.shape(1)) != T) throw x2l::Error("pos must have shape [n_axes, T]");
    if (static_cast<int64_t>(freq.size()) != D / 2 || static_cast<int64_t>(axis.size()) != D / 2)
        throw x2l::Error("freq and axis must have head_dim / 2 entries");
    const int n_axes = static_cast<int>(pos.shape(0));
    return rope_probe(x, pos.data(), pos.nbytes(), in_place, [&](const float* dx, float* dy, const int32_t* dp, void* s) {
        // one_row: every axis reads row 0 (stride 0, as a text token's single position)
        x2l::cuda_rope_axes(dx, dy, dp, one_row ? 0 : T, T, H, D, H * D, freq.data(), axis.data(), n_axes, s);
    });
}

OutF32 op_pixel_shuffle(F32Array x, int scale) {
    require_device();
    if (x.ndim() != 4 || x.shape(1) != x.shape(2)) throw x2l::Error("x must have shape [n, side, side, C]");
    const int64_t n = static_cast<int64_t>(x.shape(0)), side = static_cast<int64_t>(x.shape(1)),
                  C = static_cast<int64_t>(x.shape(3));
    if (scale < 1 || side % scale != 0) throw x2l::Error("scale must divide the grid side");
    const int64_t g = side / scale;
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        auto dx = to_device(x.data(), x.nbytes());
        x2l::CudaDeviceBuffer dy = device_buffer(x.nbytes());
        run_sync([&](void* s) {
            x2l::cuda_pixel_shuffle(static_cast<const float*>(dx.data()), static_cast<float*>(dy.data()), n,
                                    static_cast<int>(side), scale, C, s);
        });
        out = from_device(dy, x.size());
    }
    return make_out(std::move(out), {static_cast<size_t>(n), static_cast<size_t>(g * g), static_cast<size_t>(scale * scale * C)});
}

nb::ndarray<nb::numpy, uint8_t> op_rerotate_keys(uint32_t type_id, U8Array rows, int head_dim, int n_rot, float freq_base,
                                                 bool neox, int32_t delta, bool in_place, int byte_offset) {
    require_device();
    if (byte_offset < 0 || byte_offset > 64) throw x2l::Error("byte_offset must be in 0..64");
    const size_t off = static_cast<size_t>(byte_offset);  // rows placed off an aligned start, to test the checks
    const x2l::DType t = static_cast<x2l::DType>(type_id);
    if (rows.ndim() != 2) throw x2l::Error("rows must have shape [n_rows, row_bytes]");
    const int64_t n_rows = static_cast<int64_t>(rows.shape(0));
    const size_t stride = rows.shape(1);
    auto* out = new std::vector<uint8_t>(rows.nbytes());
    nb::capsule owner(out, [](void* p) noexcept { delete static_cast<std::vector<uint8_t>*>(p); });
    {
        nb::gil_scoped_release nogil;
        auto src = device_buffer(rows.nbytes() + off);
        src.upload(rows.data(), rows.nbytes(), off);
        x2l::CudaDeviceBuffer dst;
        if (!in_place) dst = device_buffer(rows.nbytes() + off);
        char* ps = static_cast<char*>(src.data()) + off;
        char* pd = static_cast<char*>(in_place ? src.data() : dst.data()) + off;
        run_sync([&](void* s) {
            x2l::cuda_rerotate_keys(t, ps, pd, n_rows, stride, head_dim, n_rot, freq_base,
                                    neox ? x2l::RopeMode::Neox : x2l::RopeMode::Norm, delta, s);
        });
        if (!out->empty()) (in_place ? src : dst).download(out->data(), out->size(), off);
    }
    const size_t shape[2] = {static_cast<size_t>(n_rows), stride};
    return nb::ndarray<nb::numpy, uint8_t>(out->data(), 2, shape, owner);
}

nb::bytes op_gather_rows(U8Array src, I32Array ids) {
    require_device();
    if (src.ndim() != 2) throw x2l::Error("src must be [rows, row_bytes] uint8");
    const size_t row_bytes = src.shape(1);
    std::vector<uint8_t> out(ids.size() * row_bytes);
    {
        nb::gil_scoped_release nogil;
        auto ds = to_device(src.data(), src.nbytes());
        auto di = to_device(ids.data(), ids.nbytes());
        auto dd = device_buffer(out.size());
        run_sync([&](void* s) {
            x2l::cuda_gather_rows(ds.data(), static_cast<int64_t>(src.shape(0)), row_bytes, static_cast<const int32_t*>(di.data()),
                                  static_cast<int64_t>(ids.size()), dd.data(), s);
        });
        if (!out.empty()) dd.download(out.data(), out.size());
    }
    return nb::bytes(reinterpret_cast<const char*>(out.data()), out.size());
}

OutF32 op_set_rows(F32Array src, I32Array ids, F32Array dst) {
    require_device();
    if (src.ndim() != 2 || dst.ndim() != 2 || src.shape(1) != dst.shape(1)) throw x2l::Error("src [k, n] and dst [m, n]");
    if (ids.size() != src.shape(0)) throw x2l::Error("one id per src row");
    const int64_t n = static_cast<int64_t>(src.shape(1));
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        auto ds = to_device(src.data(), src.nbytes());
        auto di = to_device(ids.data(), ids.nbytes());
        auto dd = to_device(dst.data(), dst.nbytes());
        run_sync([&](void* s) {
            x2l::cuda_set_rows(static_cast<const float*>(ds.data()), static_cast<const int32_t*>(di.data()),
                               static_cast<int64_t>(ids.size()), n, static_cast<float*>(dd.data()),
                               static_cast<int64_t>(dst.shape(0)), s);
        });
        out = from_device(dd, dst.size());
    }
    return make_out(std::move(out), shape_of(dst));
}

OutF32 op_softmax(F32Array x, float scale) {
    require_device();
    int64_t n_rows, n;
    rows_of(x, n_rows, n);
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        auto dx = to_device(x.data(), x.nbytes());
        x2l::CudaDeviceBuffer dy = device_buffer(x.nbytes());
        run_sync([&](void* s) {
            x2l::cuda_softmax(static_cast<const float*>(dx.data()), static_cast<float*>(dy.data()), n_rows, n, scale, s);
        });
        out = from_device(dy, x.size());
    }
    return make_out(std::move(out), shape_of(x));
}

OutF32 op_pool2d(F32Array x, int out_grid, const std::string& kind, int stride) {
    require_device();
    if (x.ndim() != 4 || x.shape(1) != x.shape(2)) throw x2l::Error("x must have shape [n, g, g, C]");
    if (kind != "avg" && kind != "bilinear") throw x2l::Error("kind must be 'avg' or 'bilinear'");
    const int64_t n = static_cast<int64_t>(x.shape(0)), g = static_cast<int64_t>(x.shape(1)),
                  C = static_cast<int64_t>(x.shape(3));
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        auto dx = to_device(x.data(), x.nbytes());
        x2l::CudaDeviceBuffer dy = device_buffer(sizeof(float) * n * out_grid * out_grid * C);
        run_sync([&](void* s) {
            x2l::cuda_pool2d(static_cast<const float*>(dx.data()), static_cast<float*>(dy.data()), n, static_cast<int>(g),
                             out_grid, C, kind == "avg" ? x2l::PoolKind::Avg : x2l::PoolKind::Bilinear, stride, s);
        });
        out = from_device(dy, static_cast<size_t>(n * out_grid * out_grid * C));
    }
    return make_out(std::move(out), {static_cast<size_t>(n), static_cast<size_t>(out_grid), static_cast<size_t>(out_grid),
                                     static_cast<size_t>(C)});
}

// kind: 0 swiglu(a, b), 1 gelu erf(a), 2 gelu tanh(a), 3 add(a, b), 4 mul(a, b), 5 quick_gelu(a)
OutF32 op_elementwise(int kind, F32Array a, std::optional<F32Array> b) {
    require_device();
    const int64_t n = static_cast<int64_t>(a.size());
    int64_t period = n;
    if (kind == 0 && (!b || b->size() != a.size())) throw x2l::Error("gate and up must have the same size");
    if (kind == 3 || kind == 4) {
        if (!b || b->size() == 0 || a.size() % b->size() != 0) throw x2l::Error("b's size must divide a's size");
        period = static_cast<int64_t>(b->size());
    }
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        auto da = to_device(a.data(), a.nbytes());
        x2l::CudaDeviceBuffer db;
        if (b) db = to_device(b->data(), b->nbytes());
        x2l::CudaDeviceBuffer dy = device_buffer(a.nbytes());
        const float* pa = static_cast<const float*>(da.data());
        const float* pb = static_cast<const float*>(db.data());
        float* py = static_cast<float*>(dy.data());
        run_sync([&](void* s) {
            switch (kind) {
                case 0: x2l::cuda_swiglu(pa, pb, py, n, s); break;
                case 1: x2l::cuda_gelu(pa, py, n, x2l::GeluMode::Erf, s); break;
                case 2: x2l::cuda_gelu(pa, py, n, x2l::GeluMode::Tanh, s); break;
                case 5: x2l::cuda_gelu(pa, py, n, x2l::GeluMode::Quick, s); break;
                case 3: x2l::cuda_add(pa, pb, py, n, period, s); break;
                default: x2l::cuda_mul(pa, pb, py, n, period, s); break;
            }
        });
        out = from_device(dy, a.size());
    }
    return make_out(std::move(out), shape_of(a));
}

// segments: list of (k_type, k bytes as uint8 array, v_type, v bytes, n_tokens). K/V of a segment are
// [n_tokens, n_kv_head, head_dim] in their type, or [n_kv_head, n_tokens, head_dim] with head_major.
// observe_from >= 0 also runs cuda_attention_votes over the last segment (the "own" entries) for the
// query rows >= observe_from and returns (out, votes [n_kv_head, n_own]); max_votes: their maximum instead.
nb::object op_attention(F32Array q, nb::list segments, int n_kv_head, float scale, bool causal, int window, int n_splits,
                        bool head_major, int observe_from, const std::string& kernel, bool max_votes) {
    require_device();
    const x2l::CudaAttentionParams::Kernel ak = attention_kernel(kernel);
    if (q.ndim() != 3) throw x2l::Error("q must have shape [n_q, n_head, head_dim]");
    const int n_q = static_cast<int>(q.shape(0)), n_head = static_cast<int>(q.shape(1)), D = static_cast<int>(q.shape(2));
    struct HostSeg {
        uint32_t kt, vt;
        U8Array k, v;
        int64_t n;
    };
    std::vector<HostSeg> hs;
    for (nb::handle h : segments) {
        nb::tuple t = nb::cast<nb::tuple>(h);
        if (t.size() != 5) throw x2l::Error("segment must be (k_type, k, v_type, v, n_tokens)");
        hs.push_back({nb::cast<uint32_t>(t[0]), nb::cast<uint32_t>(t[2]), nb::cast<U8Array>(t[1]), nb::cast<U8Array>(t[3]),
                      nb::cast<int64_t>(t[4])});
    }
    if (observe_from >= 0 && hs.empty()) throw x2l::Error("observe_from needs at least one segment");
    const int64_t n_own = hs.empty() ? 0 : hs.back().n;  // the observed ("own") entries: the last segment
    std::vector<float> out, votes;
    {
        nb::gil_scoped_release nogil;
        std::vector<x2l::CudaDeviceBuffer> bufs;
        std::vector<x2l::CudaKVSegment> segs;
        for (const HostSeg& s : hs) {
            x2l::CudaKVSegment seg;
            seg.k_type = s.kt;
            seg.v_type = s.vt;
            seg.n_tokens = s.n;
            for (int kv = 0; kv < 2; ++kv) {
                const U8Array& arr = kv ? s.v : s.k;
                const uint32_t type = kv ? s.vt : s.kt;
                const size_t row = x2l::cuda_row_bytes(static_cast<x2l::DType>(type), D);
                if (row == 0) throw x2l::Error("KV type/head_dim combination not supported");
                if (arr.nbytes() != row * static_cast<size_t>(s.n) * n_kv_head) throw x2l::Error("segment K/V size mismatch");
                bufs.push_back(to_device(arr.data(), arr.nbytes()));
                const int64_t ts = head_major ? static_cast<int64_t>(row) : static_cast<int64_t>(row) * n_kv_head;
                const int64_t hstr = head_major ? static_cast<int64_t>(row) * s.n : static_cast<int64_t>(row);
                (kv ? seg.v : seg.k) = bufs.back().data();
                (kv ? seg.v_tok_stride : seg.k_tok_stride) = ts;
                (kv ? seg.v_head_stride : seg.k_head_stride) = hstr;
            }
            segs.push_back(seg);
        }
        auto dq = to_device(q.data(), q.nbytes());
        x2l::CudaDeviceBuffer dout = device_buffer(q.nbytes());
        const size_t ws_bytes = x2l::cuda_attention_workspace_bytes(n_q, n_head, D, n_splits > 0 ? n_splits : 64);
        x2l::CudaDeviceBuffer ws(ws_bytes);
        x2l::CudaSegmentTable table;
        x2l::CudaDeviceBuffer lse, dvotes;
        if (observe_from >= 0) {
            lse = device_buffer(sizeof(float) * n_q * n_head);
            dvotes = device_buffer(sizeof(float) * n_kv_head * n_own);
        }
        run_sync([&](void* s) {
            table.assign(segs, D, s);
            x2l::CudaAttentionParams p;
            p.q = static_cast<const float*>(dq.data());
            p.out = static_cast<float*>(dout.data());
            p.n_q = n_q;
            p.n_head = n_head;
            p.n_kv_head = n_kv_head;
            p.head_dim = D;
            p.scale = scale;
            p.causal = causal;
            p.window = window;
            p.n_splits = n_splits;
            p.kernel = ak;
            p.workspace = ws.data();
            p.workspace_bytes = ws.size();
            if (observe_from >= 0) {
                p.lse = static_cast<float*>(lse.data());
                p.lse_from = std::min(observe_from, n_q);
                dvotes.zero(s);
            }
            x2l::cuda_attention(p, table, s);
            if (observe_from >= 0) {
                x2l::cuda_attention_votes(p.q, 0, p.lse, n_q, n_head, n_kv_head, D, scale, segs.back(), n_own, observe_from,
                                          static_cast<float*>(dvotes.data()), n_own, s, max_votes);
            }
        });
        out = from_device(dout, q.size());
        if (observe_from >= 0) votes = from_device(dvotes, static_cast<size_t>(n_kv_head * n_own));
    }
    nb::object o = nb::cast(make_out(std::move(out), shape_of(q)));
    if (observe_from < 0) return o;
    return nb::make_tuple(o, make_out(std::move(votes), {static_cast<size_t>(n_kv_head), static_cast<size_t>(n_own)}));
}

// Streams data [n_layers, m] through a CudaLayerPipeline (n_slots, optionally zero-copy) while a
// "layer" kernel on the compute stream reads each slot (out = slot + 0): returns what the kernels saw.
OutF32 op_pipeline_selftest(F32Array data, int n_slots, bool zero_copy) {
    require_device();
    if (data.ndim() != 2) throw x2l::Error("data must have shape [n_layers, m]");
    const int L = static_cast<int>(data.shape(0));
    const size_t m = data.shape(1), bytes = m * sizeof(float);
    std::vector<float> out;
    {
        nb::gil_scoped_release nogil;
        x2l::CudaHostBuffer host(data.nbytes() ? data.nbytes() : 16, zero_copy);
        std::memcpy(host.data(), data.data(), data.nbytes());
        x2l::CudaStream compute;
        x2l::CudaDeviceBuffer zeros = device_buffer(bytes), dout = device_buffer(data.nbytes());
        zeros.zero(compute.handle());
        x2l::CudaLayerPipeline pipe(bytes, n_slots, zero_copy);
        std::vector<void*> where(static_cast<size_t>(L), nullptr);
        auto stage = [&](int l) {
            pipe.begin(l);
            where[l] = pipe.stage(static_cast<const char*>(host.data()) + l * bytes, bytes);
            pipe.end();
        };
        if (L > 0) stage(0);
        for (int l = 0; l < L; ++l) {
            if (n_slots > 1 && l + 1 < L) stage(l + 1);  // overlap the next copy with this layer
            pipe.wait_ready(l, compute.handle());
            x2l::cuda_add(static_cast<const float*>(where[l]), static_cast<const float*>(zeros.data()),
                          static_cast<float*>(dout.data()) + l * m, static_cast<int64_t>(m), static_cast<int64_t>(m),
                          compute.handle());
            pipe.release(l, compute.handle());
            if (n_slots == 1 && l + 1 < L) stage(l + 1);  // one slot: refill only after release
        }
        compute.synchronize();
        out = from_device(dout, data.size());
    }
    return make_out(std::move(out), shape_of(data));
}

// Host-to-device bandwidth of the L-KV reload path against plain copies of the same bytes: the
// layer pipeline (pinned source, n_slots device slots, one layer per stage, nothing computed), one
// cudaMemcpy from pinned memory and one from pageable memory. Best of reps, GB/s (1e9 bytes/s).
// Best device time in ms of reps launches of `launch(stream)` on a fresh stream, after one warm-up.
template <typename Fn>
float best_device_ms(int reps, Fn&& launch) {
    x2l::CudaStream s;
    x2l::CudaEvent a(true), b(true);
    float best = 0.f;
    for (int r = 0; r <= reps; ++r) {
        a.record(s.handle());
        launch(s.handle());
        b.record(s.handle());
        b.synchronize();
        const float ms = b.elapsed_ms_since(a);
        if (r > 0 && (best == 0.f || ms < best)) best = ms;
    }
    return best;
}

// Device time of cuda_matmul on zero-filled device buffers (weights of type_id [rows, n], x [T, n]):
// best of reps launches timed with events, after one warm-up.
nb::dict op_matmul_speed(uint32_t type_id, int64_t rows, int64_t n, int64_t T, const std::string& kernel, int reps) {
    require_device();
    const x2l::DType t = cuda_type(type_id);
    const x2l::MatmulKernel k = matmul_kernel(kernel);
    const size_t rb = x2l::cuda_row_bytes(t, n);
    if (rb == 0 || rows <= 0 || T <= 0 || reps <= 0) throw x2l::Error("bad matmul speed arguments");
    float best_ms = 0.f;
    {
        nb::gil_scoped_release nogil;
        x2l::CudaDeviceBuffer w = device_buffer(rb * static_cast<size_t>(rows)), x = device_buffer(static_cast<size_t>(T * n) * 4),
                              y = device_buffer(static_cast<size_t>(T * rows) * 4);
        w.zero();
        x.zero();
        best_ms = best_device_ms(reps, [&](void* s) {
            x2l::cuda_matmul(t, w.data(), rows, n, static_cast<const float*>(x.data()), T, static_cast<float*>(y.data()), s, k);
        });
    }
    nb::dict d;
    d["ms"] = best_ms;
    d["tflops"] = 2.0 * static_cast<double>(rows) * n * T / (best_ms * 1e-3) / 1e12;
    return d;
}

// Device time of one prefill-shaped cuda_attention: n_q new rows (the last n_q of n_kv, causal) over one
// segment of n_kv zero-filled K/V rows of kv_type, token-major; best of reps after a warm-up.
nb::dict op_attention_speed(int n_q, int n_head, int n_kv_head, int head_dim, int64_t n_kv, uint32_t kv_type,
                            const std::string& kernel, int reps, bool with_lse) {
    require_device();
    const x2l::CudaAttentionParams::Kernel ak = attention_kernel(kernel);
    const size_t row = x2l::cuda_row_bytes(static_cast<x2l::DType>(kv_type), head_dim);
    if (row == 0 || n_q <= 0 || n_kv < n_q || n_head <= 0 || n_kv_head <= 0 || reps <= 0)
        throw x2l::Error("bad attention speed arguments");
    float best_ms = 0.f;
    {
        nb::gil_scoped_release nogil;
        const size_t kv_bytes = row * static_cast<size_t>(n_kv) * n_kv_head;
        x2l::CudaDeviceBuffer k = device_buffer(kv_bytes), v = device_buffer(kv_bytes),
                              q = device_buffer(sizeof(float) * n_q * n_head * head_dim),
                              out = device_buffer(sizeof(float) * n_q * n_head * head_dim),
                              lse = device_buffer(with_lse ? sizeof(float) * n_q * n_head : 0);
        k.zero();
        v.zero();
        q.zero();
        x2l::CudaKVSegment seg;
        seg.k = k.data();
        seg.v = v.data();
        seg.k_tok_stride = seg.v_tok_stride = static_cast<int64_t>(row) * n_kv_head;
        seg.k_head_stride = seg.v_head_stride = static_cast<int64_t>(row);
        seg.n_tokens = n_kv;
        seg.k_type = seg.v_type = kv_type;
        x2l::CudaSegmentTable table;
        table.assign({seg}, head_dim, nullptr);
        x2l::cuda_device_synchronize();  // the table is on the device before the timed stream reads it
        x2l::CudaAttentionParams p;
        p.q = static_cast<const float*>(q.data());
        p.out = static_cast<float*>(out.data());
        p.n_q = n_q;
        p.n_head = n_head;
        p.n_kv_head = n_kv_head;
        p.head_dim = head_dim;
        p.n_splits = 1;
        p.kernel = ak;
        if (with_lse) p.lse = static_cast<float*>(lse.data());  // every row votes (the X²L snapkv prefill)
        best_ms = best_device_ms(reps, [&](void* s) { x2l::cuda_attention(p, table, s); });
    }
    // Causal: query t (kv index n_kv - n_q + t) sees n_kv - n_q + t + 1 keys; 2 products of head_dim each.
    const double keys = static_cast<double>(n_q) * (n_kv - n_q) + 0.5 * n_q * (n_q + 1.0);
    nb::dict d;
    d["ms"] = best_ms;
    d["tflops"] = 4.0 * keys * head_dim * n_head / (best_ms * 1e-3) / 1e12;
    return d;
}

nb::dict op_copy_bandwidth(size_t layer_bytes, int n_layers, int n_slots, int reps) {
    require_device();
    if (layer_bytes == 0 || n_layers <= 0 || n_slots <= 0 || reps <= 0) throw x2l::Error("bad copy bandwidth arguments");
    const size_t total = layer_bytes * static_cast<size_t>(n_layers);
    double pipe_best = 0, pinned_best = 0, pageable_best = 0;
    {
        nb::gil_scoped_release nogil;
        x2l::CudaHostBuffer pinned(total);
        std::vector<uint8_t> pageable(total, 1);
        std::memset(pinned.data(), 1, total);
        x2l::CudaDeviceBuffer dst = device_buffer(total);
        x2l::CudaStream compute;
        x2l::CudaLayerPipeline pipe(layer_bytes, n_slots, false);
        using clock = std::chrono::steady_clock;
        auto gbps = [&](clock::time_point t0) {
            return static_cast<double>(total) / std::chrono::duration<double>(clock::now() - t0).count() / 1e9;
        };
        for (int r = 0; r <= reps; ++r) {  // r == 0 warms up
            pipe.reset();
            auto t0 = clock::now();
            for (int l = 0; l < n_layers; ++l) {
                pipe.begin(l);
                pipe.stage(static_cast<const uint8_t*>(pinned.data()) + l * layer_bytes, layer_bytes);
                pipe.end();
                pipe.wait_ready(l, compute.handle());
                pipe.release(l, compute.handle());
            }
            compute.synchronize();
            const double a = gbps(t0);
            t0 = clock::now();
            dst.upload(pinned.data(), total);
            const double b = gbps(t0);
            t0 = clock::now();
            dst.upload(pageable.data(), total);
            const double c = gbps(t0);
            if (r > 0) pipe_best = std::max(pipe_best, a), pinned_best = std::max(pinned_best, b), pageable_best = std::max(pageable_best, c);
        }
    }
    nb::dict d;
    d["bytes"] = total;
    d["layers"] = n_layers;
    d["pipeline_gbps"] = pipe_best;
    d["memcpy_pinned_gbps"] = pinned_best;
    d["memcpy_pageable_gbps"] = pageable_best;
    return d;
}


}  // namespace

void bind_cuda_probes(nb::module_& m) {
    m.def("cuda_matmul", &op_matmul, "type_id"_a, "w"_a, "rows"_a, "n"_a, "x"_a, "kernel"_a = "auto",
          "y[T, rows] = x[T, n] @ W.T on the GPU; w: raw rows of the given ggml type (uint8 array). kernel: 'auto'\n"
          "(matvec up to 8 tokens, tiled f32 up to 63, tensor cores from 64), or force 'f32' / 'tensor_core' tiles.");
    m.def("cuda_get_rows", &op_get_rows, "type_id"_a, "table"_a, "n_rows"_a, "n"_a, "ids"_a,
          "Dequantized rows table[ids] -> float32 [len(ids), n].");
    m.def("cuda_rms_norm", [](F32Array x, std::optional<F32Array> w, float eps) { return op_norm(x, w, std::nullopt, eps, false); },
          "x"_a, "w"_a = nb::none(), "eps"_a = 1e-6f);
    m.def("cuda_layer_norm", [](F32Array x, std::optional<F32Array> w, std::optional<F32Array> b, float eps) {
              return op_norm(x, w, b, eps, true);
          }, "x"_a, "w"_a = nb::none(), "b"_a = nb::none(), "eps"_a = 1e-5f);
    m.def("cuda_rope", &op_rope, "x"_a, "pos"_a, "n_rot"_a, "freq_base"_a = 10000.f, "freq_scale"_a = 1.f,
          "neox"_a = false, "in_place"_a = false, "x: [T, n_head, head_dim]; NORM pairs (2i, 2i+1), NEOX (i, i + n_rot/2).");
    m.def("cuda_rope_axes", &op_rope_axes, "x"_a, "pos"_a, "freq"_a, "axis"_a, "in_place"_a = false, "one_row"_a = false,
          "x: [T, n_head, head_dim]; NEOX pair i rotates by pos[axis[i], t] * freq[i] (M-RoPE, the ViT's 2-D rotary);\n"
          "one_row: every axis reads pos[0] (axis stride 0).");
    m.def("cuda_pixel_shuffle", &op_pixel_shuffle, "x"_a, "scale"_a,
          "x [n, side, side, C] -> [n, (side/scale)^2, scale^2 * C] (Idefics3's connector).");
    m.def("cuda_rerotate_keys", &op_rerotate_keys, "type_id"_a, "rows"_a, "head_dim"_a, "n_rot"_a, "freq_base"_a = 10000.f,
          "neox"_a = false, "delta"_a = 0, "in_place"_a = false, "byte_offset"_a = 0,
          "Key rows [n_rows, row_bytes] of a ggml type (f32, f16, q8_0, q4_0) rotated by delta more positions.");
    m.def("cuda_gather_rows", &op_gather_rows, "src"_a, "ids"_a,
          "src [rows, row_bytes] uint8: the bytes of rows ids, as they are (zero rows for ids out of range).");
    m.def("cuda_set_rows", &op_set_rows, "src"_a, "ids"_a, "dst"_a, "dst[ids[i]] = src[i]; returns the new dst.");
    m.def("cuda_softmax", &op_softmax, "x"_a, "scale"_a = 1.f);
    m.def("cuda_swiglu", [](F32Array g, F32Array u) { return op_elementwise(0, g, u); }, "gate"_a, "up"_a);
    m.def("cuda_gelu", [](F32Array x, const std::string& approximate) {
              if (approximate != "none" && approximate != "tanh" && approximate != "quick")
                  throw x2l::Error("approximate must be 'none', 'tanh' or 'quick'");
              return op_elementwise(approximate == "none" ? 1 : approximate == "tanh" ? 2 : 5, x, std::nullopt);
          }, "x"_a, "approximate"_a = "none", "gelu (erf), its tanh approximation, or CLIP's quick_gelu.");
    m.def("cuda_pool2d", &op_pool2d, "x"_a, "out_grid"_a, "kind"_a = "avg", "stride"_a = 2,
          "x [n, g, g, C] -> [n, out_grid, out_grid, C]: 'avg' (stride x stride blocks) or 'bilinear' resize.");
    m.def("cuda_add", [](F32Array a, F32Array b) { return op_elementwise(3, a, b); }, "a"_a, "b"_a,
          "a + b; b is broadcast when its size divides a's (row bias).");
    m.def("cuda_mul", [](F32Array a, F32Array b) { return op_elementwise(4, a, b); }, "a"_a, "b"_a);
    m.def("cuda_attention", &op_attention, "q"_a, "segments"_a, "n_kv_head"_a, "scale"_a = 0.f, "causal"_a = true,
          "window"_a = 0, "n_splits"_a = 0, "head_major"_a = false, "observe_from"_a = -1, "kernel"_a = "auto",
          "max_votes"_a = false,
          "Attention of q [n_q, n_head, head_dim] over segments [(k_type, k, v_type, v, n_tokens), ...] in time order.\n"
          "observe_from >= 0: returns (out, votes [n_kv_head, n_own]), the softmax probabilities of query rows >=\n"
          "observe_from summed per KV head over the last segment's entries (cuda_attention_votes; max_votes: the\n"
          "largest of them instead of the sum).\n"
          "kernel: 'auto' (tensor cores from 64 query rows per KV head, head_dim <= 128; the votes' log-sum-exp\n"
          "then from a second pass on f32 scores), 'f32', or 'tensor_core' (log-sum-exp from its f16 operands).");
    m.def("cuda_pipeline_selftest", &op_pipeline_selftest, "data"_a, "n_slots"_a = 2, "zero_copy"_a = false,
          "Copies data [n_layers, m] layer by layer through CudaLayerPipeline; returns what the kernels read.");
    m.def("cuda_matmul_speed", &op_matmul_speed, "type_id"_a, "rows"_a, "n"_a, "T"_a, "kernel"_a = "auto", "reps"_a = 5,
          "{ms, tflops}: device time of one cuda_matmul [T, n] x [rows, n]^T on zero-filled buffers (best of reps).");
    m.def("cuda_attention_speed", &op_attention_speed, "n_q"_a, "n_head"_a, "n_kv_head"_a, "head_dim"_a, "n_kv"_a,
          "kv_type"_a = 1, "kernel"_a = "auto", "reps"_a = 5, "with_lse"_a = false,
          "{ms, tflops}: device time of one causal cuda_attention of n_q rows over n_kv zero-filled rows (best of reps);\n"
          "with_lse: every row also writes its log-sum-exp, as for the X²L votes.");
    m.def("cuda_copy_bandwidth", &op_copy_bandwidth, "layer_bytes"_a, "n_layers"_a, "n_slots"_a = 2, "reps"_a = 3,
          "GB/s of the layer-pipelined reload vs one cudaMemcpy (pinned, pageable) of the same bytes.");
}
