#include "cuda/kv_rows.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>

#include "core/common.h"

namespace x2l {

CudaKVSegment cuda_layer_view(const CudaKVRows& s, const uint8_t* k, const uint8_t* v) {
    // KVSegment rows are [layer][head][entry]: within a layer, head-major with cap entries per head.
    CudaKVSegment seg;
    seg.k = k;
    seg.v = v;
    seg.k_tok_stride = seg.v_tok_stride = static_cast<int64_t>(s.row_bytes);
    seg.k_head_stride = seg.v_head_stride = static_cast<int64_t>(s.row_bytes) * s.cap;
    seg.n_tokens = s.n;
    seg.k_type = seg.v_type = static_cast<uint32_t>(s.type);
    return seg;
}

namespace {

void check_kv_type(const KVSegment& seg, const char* what) {
    if (!cuda_kv_type_supported(seg.type()) || seg.head_dim() % static_cast<int>(type_info(seg.type()).block_size) != 0) {
        throw Error(std::string("the CUDA attention kernel cannot read the ") + what + " tier's " +
                    type_info(seg.type()).name + " rows (head_dim " + std::to_string(seg.head_dim()) +
                    "); index the video with f16/q8_0/q4_0 tiers or use device='cpu'");
    }
}

void fill_geometry(CudaKVRows& d, const KVSegment& seg) {
    d.layer_bytes = seg.layer_bytes();
    d.row_bytes = seg.row_bytes();
    d.cap = seg.capacity();
    d.n = seg.size();
    d.type = seg.type();
}

}  // namespace

void cuda_reserve_pipeline(std::unique_ptr<CudaLayerPipeline>& pipe, size_t need, size_t alloc, int n_slots) {
    if (pipe && need <= pipe->slot_bytes()) {
        pipe->reset();
        return;
    }
    pipe.reset();
    pipe.reset(new CudaLayerPipeline(alloc, n_slots, false));
}

CudaKVRows cuda_upload_rows(const KVSegment& seg, const char* what) {
    check_kv_type(seg, what);
    CudaKVRows d;
    fill_geometry(d, seg);
    const size_t block = d.layer_bytes * static_cast<size_t>(seg.n_layer());
    d.dev = CudaDeviceBuffer(std::max<size_t>(2 * block, 256));
    d.dev.upload(seg.k_data(), block, 0);
    d.dev.upload(seg.v_data(), block, block);
    d.k = static_cast<const uint8_t*>(d.dev.data());
    d.v = d.k + block;
    return d;
}

CudaKVRows cuda_pin_rows(const KVSegment& seg, const char* what, bool mapped) {
    check_kv_type(seg, what);
    CudaKVRows d;
    fill_geometry(d, seg);
    const size_t block = d.layer_bytes * static_cast<size_t>(seg.n_layer());
    const uint8_t* k = seg.k_data();
    const uint8_t* v = seg.v_data();
    std::string refused;
    if (block > 0 && v >= k + block && v <= k + block + 64) {  // K, then V (64-byte aligned): one range
        const size_t span = static_cast<size_t>(v - k) + block;
        try {
            // An index opened with mmap=True: its file mapping is registered once for all its chunks
            // (chunks share boundary pages, which cannot be registered twice).
            d.registered = cuda_register_file_mapping(k, span, mapped, &d.registered_offset);
            if (!d.registered) {
                d.registered.reset(new CudaHostRegistration(k, span, mapped));
                d.registered_offset = 0;
            }
        } catch (const Error& e) {
            d.registered.reset();  // e.g. pages shared with a registered neighbour: copy instead
            refused = e.what();
        }
    }
    // Mapped (integrated GPUs): the device reads the rows in place; otherwise they are a DMA source.
    if (d.registered) {
        d.k = mapped ? static_cast<const uint8_t*>(d.registered->device_ptr()) + d.registered_offset : k;
        d.v = d.k + (v - k);
    } else {
        if (!refused.empty()) {
            // Unswappable RAM the size of the rows, on a Jetson taken from the same 8 GB as everything else.
            static std::atomic<bool> warned{false};
            if (!warned.exchange(true))
                std::fprintf(stderr,
                             "x2l-edge: warning: the %s rows cannot be page-locked in place (%s); copying them into "
                             "pinned memory instead (%.1f MB for this chunk; warned once)\n",
                             what, refused.c_str(), 2.0 * static_cast<double>(block) / 1e6);
        }
        d.host.reset(new CudaHostBuffer(std::max<size_t>(2 * block, 256), mapped));
        std::memcpy(d.host->data(), k, block);
        std::memcpy(static_cast<uint8_t*>(d.host->data()) + block, v, block);
        d.k = static_cast<const uint8_t*>(mapped ? d.host->device_ptr() : d.host->data());
        d.v = d.k + block;
    }
    return d;
}

}  // namespace x2l
