// XXH64 (the xxHash 64-bit algorithm, written from its public specification): a fast
// non-cryptographic checksum. It detects accidental corruption and tells files apart; it is not a
// signature (anyone can compute it for a crafted file), so loaders validate every field anyway.
#pragma once
#include <cstddef>
#include <cstdint>

namespace x2l {

// Streaming XXH64: update() any number of times, digest() gives the hash of everything so far.
class Xxh64 {
  public:
    explicit Xxh64(uint64_t seed = 0);
    void update(const void* data, size_t n);
    template <typename T>
    void update_pod(const T& v) { update(&v, sizeof(T)); }
    uint64_t digest() const;

  private:
    uint64_t acc_[4];
    uint64_t seed_;
    uint64_t total_ = 0;
    uint8_t buf_[32];  // a partial stripe
    size_t buf_len_ = 0;
};

uint64_t xxh64(const void* data, size_t n, uint64_t seed = 0);

}  // namespace x2l
