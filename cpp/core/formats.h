// Tensor formats shared by every backend: ggml's type ids, their block sizes, and the byte layout of
// each quantized block (ggml-compatible). Every format stores a row of `n` values as
// n / block_size blocks of block_bytes bytes.
#pragma once
#include <cstddef>
#include <cstdint>

namespace x2l {

// Numeric ids are ggml's `enum ggml_type` values (they are what GGUF files store).
enum class DType : uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
    I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30,
};

struct TypeInfo {
    const char* name;     // "q4_0" ...
    int64_t block_size;   // values per block (1 for plain types)
    size_t block_bytes;   // bytes per block
    bool compute;         // true when dequantize_row / vec_dot support it as a weight type
};

// nullptr for an id that is not a known ggml type.
const TypeInfo* type_info(uint32_t type_id);
// Throws FormatError for an id that is not a known ggml type.
const TypeInfo& type_info(DType t);

// Bytes for a row of n values; n must be a multiple of the block size.
size_t row_bytes(DType t, int64_t n);

// Block layouts (values per block: QK for the legacy formats, QK_K for the K-quants). Half-precision
// fields are stored as raw IEEE binary16 bits.
constexpr int QK = 32;     // values per block of the legacy formats
constexpr int QK_K = 256;  // values per K-quant super-block

struct BlockQ4_0 { uint16_t d; uint8_t qs[QK / 2]; };                    // q = nibble - 8
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[QK / 2]; };                 // x = d*q + m
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; };     // q = (nib | bit<<4) - 16
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[QK / 2]; };  // x = d*q + m
struct BlockQ8_0 { uint16_t d; int8_t qs[QK]; };
struct BlockQ8_1 { uint16_t d, s; int8_t qs[QK]; };                      // s = d * sum(qs)
struct BlockQ4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[QK_K / 2]; };
struct BlockQ6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; uint16_t d; };
struct BlockQ8_K { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; };  // bsums: sums of 16 qs
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22, "layout");
static_assert(sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34 && sizeof(BlockQ8_1) == 36, "layout");
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ6_K) == 210 && sizeof(BlockQ8_K) == 292, "layout");

}  // namespace x2l
