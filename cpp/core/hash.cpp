#include "core/hash.h"

#include <cstring>

namespace x2l {

namespace {

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull;
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kP3 = 0x165667B19E3779F9ull;
constexpr uint64_t kP4 = 0x85EBCA77C2B2AE63ull;
constexpr uint64_t kP5 = 0x27D4EB2F165667C5ull;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t read64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);  // little-endian hosts only (x86-64, aarch64)
    return v;
}
inline uint32_t read32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}
inline uint64_t round(uint64_t acc, uint64_t lane) { return rotl(acc + lane * kP2, 31) * kP1; }
inline uint64_t merge(uint64_t h, uint64_t acc) { return (h ^ round(0, acc)) * kP1 + kP4; }

}  // namespace

Xxh64::Xxh64(uint64_t seed) : seed_(seed) {
    acc_[0] = seed + kP1 + kP2;
    acc_[1] = seed + kP2;
    acc_[2] = seed;
    acc_[3] = seed - kP1;
}

void Xxh64::update(const void* data, size_t n) {
    if (n == 0) return;  // an empty section's data() may be null, which memcpy must not see
    const uint8_t* p = static_cast<const uint8_t*>(data);
    total_ += n;
    if (buf_len_ > 0) {
        const size_t take = n < 32 - buf_len_ ? n : 32 - buf_len_;
        std::memcpy(buf_ + buf_len_, p, take);
        buf_len_ += take;
        p += take;
        n -= take;
        if (buf_len_ < 32) return;
        for (int i = 0; i < 4; ++i) acc_[i] = round(acc_[i], read64(buf_ + 8 * i));
        buf_len_ = 0;
    }
    uint64_t a0 = acc_[0], a1 = acc_[1], a2 = acc_[2], a3 = acc_[3];
    for (; n >= 32; p += 32, n -= 32) {
        a0 = round(a0, read64(p));
        a1 = round(a1, read64(p + 8));
        a2 = round(a2, read64(p + 16));
        a3 = round(a3, read64(p + 24));
    }
    acc_[0] = a0, acc_[1] = a1, acc_[2] = a2, acc_[3] = a3;
    if (n > 0) {
        std::memcpy(buf_, p, n);
        buf_len_ = n;
    }
}

uint64_t Xxh64::digest() const {
    uint64_t h;
    if (total_ >= 32) {
        h = rotl(acc_[0], 1) + rotl(acc_[1], 7) + rotl(acc_[2], 12) + rotl(acc_[3], 18);
        for (int i = 0; i < 4; ++i) h = merge(h, acc_[i]);
    } else {
        h = seed_ + kP5;
    }
    h += total_;
    const uint8_t* p = buf_;
    size_t n = buf_len_;
    for (; n >= 8; p += 8, n -= 8) h = rotl(h ^ round(0, read64(p)), 27) * kP1 + kP4;
    if (n >= 4) {
        h = rotl(h ^ (static_cast<uint64_t>(read32(p)) * kP1), 23) * kP2 + kP3;
        p += 4;
        n -= 4;
    }
    for (; n > 0; ++p, --n) h = rotl(h ^ (*p * kP5), 11) * kP1;
    h ^= h >> 33;
    h *= kP2;
    h ^= h >> 29;
    h *= kP3;
    h ^= h >> 32;
    return h;
}

uint64_t xxh64(const void* data, size_t n, uint64_t seed) {
    Xxh64 h(seed);
    h.update(data, n);
    return h.digest();
}

}  // namespace x2l
