#include "core/formats.h"

#include <string>

#include "core/common.h"

namespace x2l {

namespace {

// Every ggml type id gguf-py knows (ids 4, 5, 31-33, 36-38 were removed from ggml).
constexpr uint32_t kMaxTypeId = 41;
const TypeInfo kTypeTable[kMaxTypeId + 1] = {
    /* 0 */ {"f32", 1, 4, true},
    /* 1 */ {"f16", 1, 2, true},
    /* 2 */ {"q4_0", 32, 18, true},
    /* 3 */ {"q4_1", 32, 20, true},
    /* 4 */ {nullptr, 0, 0, false},
    /* 5 */ {nullptr, 0, 0, false},
    /* 6 */ {"q5_0", 32, 22, true},
    /* 7 */ {"q5_1", 32, 24, true},
    /* 8 */ {"q8_0", 32, 34, true},
    /* 9 */ {"q8_1", 32, 36, false},  // activation format (gguf-py's table says 40: the pre-2023 layout)
    /* 10 */ {"q2_K", 256, 84, false},
    /* 11 */ {"q3_K", 256, 110, false},
    /* 12 */ {"q4_K", 256, 144, true},
    /* 13 */ {"q5_K", 256, 176, false},
    /* 14 */ {"q6_K", 256, 210, true},
    /* 15 */ {"q8_K", 256, 292, false},  // activation format
    /* 16 */ {"iq2_xxs", 256, 66, false},
    /* 17 */ {"iq2_xs", 256, 74, false},
    /* 18 */ {"iq3_xxs", 256, 98, false},
    /* 19 */ {"iq1_s", 256, 50, false},
    /* 20 */ {"iq4_nl", 32, 18, false},
    /* 21 */ {"iq3_s", 256, 110, false},
    /* 22 */ {"iq2_s", 256, 82, false},
    /* 23 */ {"iq4_xs", 256, 136, false},
    /* 24 */ {"i8", 1, 1, false},
    /* 25 */ {"i16", 1, 2, false},
    /* 26 */ {"i32", 1, 4, false},
    /* 27 */ {"i64", 1, 8, false},
    /* 28 */ {"f64", 1, 8, false},
    /* 29 */ {"iq1_m", 256, 56, false},
    /* 30 */ {"bf16", 1, 2, true},
    /* 31 */ {nullptr, 0, 0, false},
    /* 32 */ {nullptr, 0, 0, false},
    /* 33 */ {nullptr, 0, 0, false},
    /* 34 */ {"tq1_0", 256, 54, false},
    /* 35 */ {"tq2_0", 256, 66, false},
    /* 36 */ {nullptr, 0, 0, false},
    /* 37 */ {nullptr, 0, 0, false},
    /* 38 */ {nullptr, 0, 0, false},
    /* 39 */ {"mxfp4", 32, 17, false},
    /* 40 */ {"nvfp4", 64, 36, false},
    /* 41 */ {"q1_0", 128, 18, false},
};

}  // namespace

const TypeInfo* type_info(uint32_t type_id) {
    if (type_id > kMaxTypeId || !kTypeTable[type_id].name) return nullptr;
    return &kTypeTable[type_id];
}

const TypeInfo& type_info(DType t) {
    const TypeInfo* ti = type_info(static_cast<uint32_t>(t));
    if (!ti) throw FormatError("unknown tensor type id " + std::to_string(static_cast<uint32_t>(t)));
    return *ti;
}

size_t row_bytes(DType t, int64_t n) {
    const TypeInfo& ti = type_info(t);
    if (n < 0 || n % ti.block_size != 0)
        throw Error(std::string("row of ") + std::to_string(n) + " values is not a multiple of the " + ti.name +
                    " block size");
    return static_cast<size_t>(n / ti.block_size) * ti.block_bytes;
}

}  // namespace x2l
