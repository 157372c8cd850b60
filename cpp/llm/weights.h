// Reading model weights out of a GGUF file: matrices stay in the mapping, small vectors become f32.
// Shared by the LLM and the vision tower so both validate shapes and types the same way.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/gguf.h"
#include "cpu/ops.h"

namespace x2l {

// A [n_out rows x n_in] matrix in any compute type; FormatError if missing, misshapen or unsupported.
// Adds its bytes to total.
Weight load_weight(const GGUFFile& f, const std::string& name, int64_t n_in, int64_t n_out, size_t& total);

// An f32/f16/bf16 tensor of shape ne (ggml order) read into f32. Adds its bytes to total.
std::vector<float> load_floats(const GGUFFile& f, const std::string& name, std::vector<int64_t> ne, size_t& total);

// An integer metadata value in [1, max]; FormatError otherwise.
int positive_key(const GGUFFile& f, const std::string& key, int64_t max);
// A float setting that must be finite and in (lo, hi]; dflt when the key is absent. Checked before
// the narrowing to float (a NaN epsilon would make every logit NaN; a huge double is undefined
// behaviour to convert).
float bounded_float_key(const GGUFFile& f, const std::string& key, double dflt, double lo, double hi);

}  // namespace x2l
