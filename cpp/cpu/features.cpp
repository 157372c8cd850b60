#include "cpu/features.h"

#include <thread>

namespace x2l {

std::string cpu_features() {
    std::string s;
#if defined(__AVX512F__)
    s += "AVX512F ";
#endif
#if defined(__AVX2__)
    s += "AVX2 ";
#endif
#if defined(__FMA__)
    s += "FMA ";
#endif
#if defined(__F16C__)
    s += "F16C ";
#endif
#if defined(__ARM_NEON)
    s += "NEON ";
#endif
#if defined(__ARM_FEATURE_DOTPROD)
    s += "DOTPROD ";
#endif
    if (s.empty()) return "scalar";
    s.pop_back();
    return s;
}

int default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(n);
}

}  // namespace x2l
