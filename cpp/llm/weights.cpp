#include "llm/weights.h"

#include <cmath>
#include <sstream>

#include "core/common.h"

namespace x2l {

Weight load_weight(const GGUFFile& f, const std::string& name, int64_t n_in, int64_t n_out, size_t& total) {
    const GGUFTensor& t = f.require_tensor(name, {n_in, n_out});
    const TypeInfo& ti = type_info(t.type);
    if (!ti.compute) {
        throw FormatError("tensor '" + name + "' has type " + ti.name + ", which this runtime does not support");
    }
    if (n_in % ti.block_size != 0) {
        throw FormatError("tensor '" + name + "' has type " + ti.name + " but its rows (" + std::to_string(n_in) +
                          ") are not a whole number of blocks");
    }
    Weight w;
    w.type = t.type;
    w.n_in = n_in;
    w.n_out = n_out;
    w.data = t.data;
    w.row_bytes = row_bytes(t.type, n_in);
    total += t.nbytes;
    return w;
}

std::vector<float> load_floats(const GGUFFile& f, const std::string& name, std::vector<int64_t> ne, size_t& total) {
    const GGUFTensor& t = f.require_tensor(name, ne);
    if (t.type != DType::F32 && t.type != DType::F16 && t.type != DType::BF16) {
        throw FormatError("tensor '" + name + "' must be f32, f16 or bf16 (got " + type_info(t.type).name + ")");
    }
    std::vector<float> out(static_cast<size_t>(t.n_elements()));
    dequantize_row(t.type, t.data, out.data(), t.n_elements());
    total += t.nbytes;
    return out;
}

int positive_key(const GGUFFile& f, const std::string& key, int64_t max) {
    int64_t v = f.get_int(key);
    if (v <= 0 || v > max) throw FormatError("metadata key '" + key + "' has invalid value " + std::to_string(v));
    return static_cast<int>(v);
}

float bounded_float_key(const GGUFFile& f, const std::string& key, double dflt, double lo, double hi) {
    const double v = f.get_float(key, dflt);
    if (!std::isfinite(v) || !(v > lo) || v > hi) {
        std::ostringstream os;
        os << "metadata key '" << key << "' has invalid value " << v << " (must be finite, > " << lo << " and <= " << hi
           << ")";
        throw FormatError(os.str());
    }
    return static_cast<float>(v);
}

}  // namespace x2l
