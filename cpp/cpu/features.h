// Which compute backends this build and this machine offer.
#pragma once
#include <string>

namespace x2l {

// SIMD features the CPU kernels were compiled with, e.g. "AVX2 FMA F16C" or "NEON DOTPROD".
std::string cpu_features();
// Number of threads used when the caller asks for "auto": the machine's hardware threads.
int default_threads();

}  // namespace x2l
