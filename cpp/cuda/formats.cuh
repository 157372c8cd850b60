// Device-side readers for the ggml block formats (private to cpp/cuda).
//
// Every format is read in "units": a thread loads one unit of VPT = NG*G values from a row, as NG
// groups of G consecutive values; group g starts at row position pos0(u) + g*GAP. The unit shapes are
// chosen so that
//   - the 32 lanes of a warp reading units u..u+31 touch one contiguous run of bytes (coalesced), and
//   - units [k0/VPT, (k0+64)/VPT) cover exactly the row positions [k0, k0+64) for any k0 that is a
//     multiple of 64 (the tiled matmul's K step and the attention tile loader rely on this).
// The functions are __host__ __device__ so that a host program can check them against the CPU
// reference without a GPU.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#define X2L_HD __host__ __device__ __forceinline__

namespace x2l {
namespace cudak {

// ggml type ids (x2l::DType values).
enum : int { kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14, kBF16 = 30 };

X2L_HD float half_bits_to_float(uint32_t h) {
    __half_raw r;
    r.x = static_cast<unsigned short>(h);
    return __half2float(__half(r));
}
X2L_HD float f32_bits(uint32_t b) {  // memcpy: portable between host and device, compiles to a move
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}
// Loads at the alignment the block layouts guarantee (ggml blocks are packed: 2-byte aligned at best).
X2L_HD uint32_t ld_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }
X2L_HD uint32_t ld_u32_a2(const uint8_t* p) { return ld_u16(p) | (ld_u16(p + 2) << 16); }
X2L_HD uint32_t ld_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Four signed bytes of w -> floats.
X2L_HD void i8x4(uint32_t w, float* out) {
    out[0] = static_cast<float>(static_cast<int8_t>(w & 0xFF));
    out[1] = static_cast<float>(static_cast<int8_t>((w >> 8) & 0xFF));
    out[2] = static_cast<float>(static_cast<int8_t>((w >> 16) & 0xFF));
    out[3] = static_cast<float>(static_cast<int8_t>(w >> 24));
}

template <int T>
struct Fmt;

// Plain types: a "block" is one unit of 4 values (F32 needs 16-byte, F16 8-byte aligned rows).
template <>
struct Fmt<kF32> {
    static constexpr int QK = 4, BYTES = 16, ALIGN = 16, NG = 1, G = 4, GAP = 0, VPT = 4;
    X2L_HD static int pos0(int u) { return 4 * u; }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const float4 a = reinterpret_cast<const float4*>(row)[u];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    }
};

template <>
struct Fmt<kF16> {
    static constexpr int QK = 4, BYTES = 8, ALIGN = 8, NG = 1, G = 4, GAP = 0, VPT = 4;
    X2L_HD static int pos0(int u) { return 4 * u; }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const uint2 a = reinterpret_cast<const uint2*>(row)[u];
        v[0] = half_bits_to_float(a.x & 0xFFFF);
        v[1] = half_bits_to_float(a.x >> 16);
        v[2] = half_bits_to_float(a.y & 0xFFFF);
        v[3] = half_bits_to_float(a.y >> 16);
    }
};

// BF16: the high half of an f32 (converters write it for bf16 checkpoints).
template <>
struct Fmt<kBF16> {
    static constexpr int QK = 4, BYTES = 8, ALIGN = 8, NG = 1, G = 4, GAP = 0, VPT = 4;
    X2L_HD static int pos0(int u) { return 4 * u; }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const uint2 a = reinterpret_cast<const uint2*>(row)[u];
        v[0] = f32_bits(a.x << 16);
        v[1] = f32_bits(a.x & 0xFFFF0000u);
        v[2] = f32_bits(a.y << 16);
        v[3] = f32_bits(a.y & 0xFFFF0000u);
    }
};

// Q8_0 {fp16 d; int8 qs[32]}: 4 units of 8 consecutive values per block.
template <>
struct Fmt<kQ8_0> {
    static constexpr int QK = 32, BYTES = 34, ALIGN = 2, NG = 1, G = 8, GAP = 0, VPT = 8;
    X2L_HD static int pos0(int u) { return 8 * u; }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const uint8_t* b = row + (u >> 2) * BYTES;
        const uint8_t* q = b + 2 + 8 * (u & 3);
        const float d = half_bits_to_float(ld_u16(b));
        i8x4(ld_u32_a2(q), v);
        i8x4(ld_u32_a2(q + 4), v + 4);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] *= d;
    }
};

// Q4_0 {fp16 d; uint8 qs[16]}: byte j holds value j (low nibble) and j+16 (high). Unit s of a block
// reads qs[4s..4s+3]: values 4s..4s+3 and 16+4s..16+4s+3.
template <>
struct Fmt<kQ4_0> {
    static constexpr int QK = 32, BYTES = 18, ALIGN = 2, NG = 2, G = 4, GAP = 16, VPT = 8;
    X2L_HD static int pos0(int u) { return 32 * (u >> 2) + 4 * (u & 3); }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const uint8_t* b = row + (u >> 2) * BYTES;
        const float d = half_bits_to_float(ld_u16(b));
        const uint32_t q = ld_u32_a2(b + 2 + 4 * (u & 3));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = (static_cast<int>((q >> (8 * i)) & 0xF) - 8) * d;
            v[4 + i] = (static_cast<int>((q >> (8 * i + 4)) & 0xF) - 8) * d;
        }
    }
};

// Q4_1 {fp16 d; fp16 m; uint8 qs[16]}: value = q*d + m, same nibble layout as Q4_0.
template <>
struct Fmt<kQ4_1> {
    static constexpr int QK = 32, BYTES = 20, ALIGN = 4, NG = 2, G = 4, GAP = 16, VPT = 8;
    X2L_HD static int pos0(int u) { return 32 * (u >> 2) + 4 * (u & 3); }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const uint8_t* b = row + (u >> 2) * BYTES;
        const uint32_t dm = ld_u32(b);
        const float d = half_bits_to_float(dm & 0xFFFF), m = half_bits_to_float(dm >> 16);
        const uint32_t q = ld_u32(b + 4 + 4 * (u & 3));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = static_cast<float>((q >> (8 * i)) & 0xF) * d + m;
            v[4 + i] = static_cast<float>((q >> (8 * i + 4)) & 0xF) * d + m;
        }
    }
};

// The 5-bit values of unit s of a Q5_0/Q5_1 block: nibbles from q = qs[4s..4s+3] (low: values 4s+i,
// high: 16+4s+i), bit 4 of value j from bit j of qh (little-endian u32). out[i], out[4 + i]: 0..31.
X2L_HD void q5_unit(uint32_t q, uint32_t qh, int s, int* out) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int j = 4 * s + i;
        out[i] = static_cast<int>(((q >> (8 * i)) & 0xF) | (((qh >> j) & 1) << 4));
        out[4 + i] = static_cast<int>(((q >> (8 * i + 4)) & 0xF) | (((qh >> (j + 16)) & 1) << 4));
    }
}

// Q5_0 {fp16 d; uint8 qh[4]; uint8 qs[16]}: value = (q - 16) * d, q as q5_unit reads it.
template <>
struct Fmt<kQ5_0> {
    static constexpr int QK = 32, BYTES = 22, ALIGN = 2, NG = 2, G = 4, GAP = 16, VPT = 8;
    X2L_HD static int pos0(int u) { return 32 * (u >> 2) + 4 * (u & 3); }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const uint8_t* b = row + (u >> 2) * BYTES;
        const int s = u & 3;
        const float d = half_bits_to_float(ld_u16(b));
        int q[8];
        q5_unit(ld_u32_a2(b + 6 + 4 * s), ld_u32_a2(b + 2), s, q);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = (q[i] - 16) * d;
    }
};

// Q5_1 {fp16 d; fp16 m; uint8 qh[4]; uint8 qs[16]}: value = q * d + m, q as q5_unit reads it.
template <>
struct Fmt<kQ5_1> {
    static constexpr int QK = 32, BYTES = 24, ALIGN = 4, NG = 2, G = 4, GAP = 16, VPT = 8;
    X2L_HD static int pos0(int u) { return 32 * (u >> 2) + 4 * (u & 3); }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const uint8_t* b = row + (u >> 2) * BYTES;
        const int s = u & 3;
        const uint32_t dm = ld_u32(b);
        const float d = half_bits_to_float(dm & 0xFFFF), m = half_bits_to_float(dm >> 16);
        int q[8];
        q5_unit(ld_u32(b + 8 + 4 * s), ld_u32(b + 4), s, q);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(q[i]) * d + m;
    }
};

// Q4_K super-block (256 values, 144 B): {fp16 d; fp16 dmin; uint8 scales[12]; uint8 qs[128]}.
// 64-value group j uses qs[32j..32j+31]: low nibbles are sub-block 2j, high nibbles sub-block 2j+1;
// sub-block i has a 6-bit scale and min packed in `scales`. Unit s = 8j + t reads qs[32j+4t..+3].
X2L_HD void q4k_scale_min(int i, const uint8_t* sc, int& s, int& m) {
    if (i < 4) {
        s = sc[i] & 63;
        m = sc[i + 4] & 63;
    } else {
        s = (sc[i + 4] & 0xF) | ((sc[i - 4] >> 6) << 4);
        m = (sc[i + 4] >> 4) | ((sc[i] >> 6) << 4);
    }
}

template <>
struct Fmt<kQ4_K> {
    static constexpr int QK = 256, BYTES = 144, ALIGN = 4, NG = 2, G = 4, GAP = 32, VPT = 8;
    X2L_HD static int pos0(int u) { return 256 * (u >> 5) + 64 * ((u >> 3) & 3) + 4 * (u & 7); }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const uint8_t* b = row + (u >> 5) * BYTES;
        const int s = u & 31, j = s >> 3;
        const uint32_t dd = ld_u32(b);
        const float d = half_bits_to_float(dd & 0xFFFF), dmin = half_bits_to_float(dd >> 16);
        int sc0, m0, sc1, m1;
        q4k_scale_min(2 * j, b + 4, sc0, m0);
        q4k_scale_min(2 * j + 1, b + 4, sc1, m1);
        const float d0 = d * sc0, n0 = dmin * m0, d1 = d * sc1, n1 = dmin * m1;
        const uint32_t q = ld_u32(b + 16 + 4 * s);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = d0 * static_cast<float>((q >> (8 * i)) & 0xF) - n0;
            v[4 + i] = d1 * static_cast<float>((q >> (8 * i + 4)) & 0xF) - n1;
        }
    }
};

// Q6_K super-block (256 values, 210 B): {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d}.
// Half h (128 values) uses ql[64h..64h+63], qh[32h..32h+31], scales[8h..8h+7]; for l < 32 its values
// l, l+32, l+64, l+96 take ql[l]&15, ql[l+32]&15, ql[l]>>4, ql[l+32]>>4 plus qh[l] bits 0-1, 2-3, 4-5,
// 6-7, minus 32; value v of the half has scale index v/16. Unit s = 16h + 8hi + t covers half
// positions 64hi + 4t..+3 and 64hi + 32 + 4t..+3 (hi selects the nibble and the qh bit pairs).
template <>
struct Fmt<kQ6_K> {
    static constexpr int QK = 256, BYTES = 210, ALIGN = 2, NG = 2, G = 4, GAP = 32, VPT = 8;
    X2L_HD static int pos0(int u) { return 256 * (u >> 5) + 128 * ((u >> 4) & 1) + 64 * ((u >> 3) & 1) + 4 * (u & 7); }
    X2L_HD static void load(const uint8_t* row, int u, float* v) {
        const uint8_t* b = row + (u >> 5) * BYTES;
        const int s = u & 31, h = s >> 4, hi = (s >> 3) & 1, t = s & 7;
        const float d = half_bits_to_float(ld_u16(b + 208));
        const uint32_t qa = ld_u32_a2(b + 64 * h + 4 * t);        // ql[l], l = 4t..4t+3
        const uint32_t qb = ld_u32_a2(b + 64 * h + 32 + 4 * t);   // ql[l + 32]
        const uint32_t qh = ld_u32_a2(b + 128 + 32 * h + 4 * t);  // qh[l]
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * h + (t >> 2) + 4 * hi;
        const float da = d * sc[0], db = d * sc[2];
        const int nib = 4 * hi, hs = 4 * hi;  // nibble shift; qh shift of the first bit pair
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int ha = static_cast<int>((qh >> (8 * i + hs)) & 3);
            const int hb = static_cast<int>((qh >> (8 * i + hs + 2)) & 3);
            const int a = static_cast<int>((qa >> (8 * i + nib)) & 0xF) | (ha << 4);
            const int c = static_cast<int>((qb >> (8 * i + nib)) & 0xF) | (hb << 4);
            v[i] = da * static_cast<float>(a - 32);
            v[4 + i] = db * static_cast<float>(c - 32);
        }
    }
};

// Runtime dispatch helper: calls f(Fmt<T>{}) for the format id, returns false if unsupported.
template <typename F>
inline bool dispatch_format(int type, F&& f) {
    switch (type) {
        case kF32: f(Fmt<kF32>{}); return true;
        case kF16: f(Fmt<kF16>{}); return true;
        case kQ8_0: f(Fmt<kQ8_0>{}); return true;
        case kQ4_0: f(Fmt<kQ4_0>{}); return true;
        case kQ4_1: f(Fmt<kQ4_1>{}); return true;
        case kQ5_0: f(Fmt<kQ5_0>{}); return true;
        case kQ5_1: f(Fmt<kQ5_1>{}); return true;
        case kBF16: f(Fmt<kBF16>{}); return true;
        case kQ4_K: f(Fmt<kQ4_K>{}); return true;
        case kQ6_K: f(Fmt<kQ6_K>{}); return true;
        default: return false;
    }
}

}  // namespace cudak
}  // namespace x2l
