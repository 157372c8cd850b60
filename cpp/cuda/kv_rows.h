// Host KV segments (cpu/kv_cache.h) made readable by the CUDA attention kernels: copied to device memory
// (resident rows: a sink, H tiers) or page-locked where they are (L tiers, the source of the layer-
// pipelined copies; read in place on integrated GPUs).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "cpu/kv_cache.h"
#include "cuda/backend.h"

namespace x2l {

// One KVSegment's rows on the device (or in mapped pinned memory), in its [layer][head][entry] layout.
struct CudaKVRows {
    CudaDeviceBuffer dev;
    // L tier only: the index's own rows page-locked in place, or (when the driver refuses) a pinned copy.
    std::shared_ptr<CudaHostRegistration> registered;
    size_t registered_offset = 0;  // of k within the registration (a whole file mapping may be shared)
    std::unique_ptr<CudaHostBuffer> host;
    const uint8_t* k = nullptr;            // [n_layer][n_head_kv][cap] rows
    const uint8_t* v = nullptr;
    size_t layer_bytes = 0, row_bytes = 0;
    int64_t cap = 0, n = 0;
    DType type = DType::F16;
};
// Copies seg's rows to device memory (Error naming `what` when the attention kernel cannot read its type).
CudaKVRows cuda_upload_rows(const KVSegment& seg, const char* what);
// Page-locks seg's rows where they are (a pinned copy when the driver refuses); mapped=true (integrated
// GPUs) makes k/v device pointers the kernels read in place, otherwise k/v are host DMA sources.
CudaKVRows cuda_pin_rows(const KVSegment& seg, const char* what, bool mapped);
// Layer l's rows of r (k, v: where that layer's K and V rows start) as an attention segment.
CudaKVSegment cuda_layer_view(const CudaKVRows& r, const uint8_t* k, const uint8_t* v);

// `pipe`, reset, when its slots hold `need` bytes; otherwise a new one with n_slots slots of `alloc`
// (>= need) bytes, made after the old one is freed (the device may not hold both).
void cuda_reserve_pipeline(std::unique_ptr<CudaLayerPipeline>& pipe, size_t need, size_t alloc, int n_slots);

}  // namespace x2l
