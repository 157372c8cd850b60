// GGUF reader: memory-maps a file, validates its header, metadata and tensor table, and gives
// zero-copy access to tensor data. Versions 2 and 3, every metadata value type, general.alignment.
// Every malformed input raises x2l::FormatError naming the problem; nothing reads past the mapping.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/formats.h"

namespace x2l {

enum class GGUFType : uint32_t {
    UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
    STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* gguf_type_name(GGUFType t);

// One metadata value. Scalars live in i/u/f/b/str; arrays keep their element type and the
// elements in the matching vector (strings in arr_str, integers and bools in arr_int, floats in
// arr_float, nested arrays in arr_nested).
struct GGUFValue {
    GGUFType type = GGUFType::UINT8;
    int64_t i = 0;  // signed view of any integer or bool
    uint64_t u = 0; // unsigned view of any integer
    double f = 0.0;
    std::string str;
    GGUFType arr_type = GGUFType::UINT8;
    uint64_t arr_len = 0;
    std::vector<std::string> arr_str;
    std::vector<int64_t> arr_int;
    std::vector<double> arr_float;
    std::vector<GGUFValue> arr_nested;

    bool is_int() const;
    bool is_float() const;
};

struct GGUFTensor {
    std::string name;
    int n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};  // ggml order: ne[0] is the contiguous (row) dimension
    DType type = DType::F32;
    uint64_t offset = 0;  // relative to the data section
    size_t nbytes = 0;
    const uint8_t* data = nullptr;  // into the mapping

    int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
    int64_t n_rows() const { return ne[1] * ne[2] * ne[3]; }
    std::string shape_str() const;
};

class GGUFFile {
  public:
    // Opens and validates. Throws FormatError (bad magic, truncation, bad offsets, unknown types...).
    static std::unique_ptr<GGUFFile> open(const std::string& path);
    // Parses an in-memory image (copied); used by the fuzz target and tests.
    static std::unique_ptr<GGUFFile> from_bytes(const uint8_t* data, size_t size);
    ~GGUFFile();
    GGUFFile(const GGUFFile&) = delete;
    GGUFFile& operator=(const GGUFFile&) = delete;

    uint32_t version() const { return version_; }
    size_t alignment() const { return alignment_; }
    size_t file_size() const { return size_; }
    const std::string& path() const { return path_; }

    // Metadata access. find() returns nullptr when absent; the get_* helpers throw FormatError
    // naming the key when it is missing or has the wrong type.
    const GGUFValue* find(const std::string& key) const;
    bool has(const std::string& key) const { return find(key) != nullptr; }
    const std::vector<std::string>& keys() const { return key_order_; }
    std::string get_str(const std::string& key) const;
    std::string get_str(const std::string& key, const std::string& dflt) const;
    int64_t get_int(const std::string& key) const;
    int64_t get_int(const std::string& key, int64_t dflt) const;
    double get_float(const std::string& key) const;  // accepts integer values too
    double get_float(const std::string& key, double dflt) const;
    bool get_bool(const std::string& key, bool dflt) const;
    const std::vector<std::string>& get_str_array(const std::string& key) const;
    std::vector<int64_t> get_int_array(const std::string& key) const;
    std::vector<double> get_float_array(const std::string& key) const;

    // Tensors, in file order.
    const std::vector<GGUFTensor>& tensors() const { return tensors_; }
    const GGUFTensor* find_tensor(const std::string& name) const;
    // Throws FormatError when missing or when the shape differs (ne given in ggml order; -1 = any).
    const GGUFTensor& require_tensor(const std::string& name, std::vector<int64_t> ne = {}) const;

  private:
    GGUFFile() = default;
    void parse();

    std::string path_;
    const uint8_t* base_ = nullptr;
    size_t size_ = 0;
    bool mapped_ = false;               // munmap on destruction
    std::vector<uint8_t> owned_;        // from_bytes copy
    uint32_t version_ = 0;
    size_t alignment_ = 32;
    std::map<std::string, GGUFValue> kv_;
    std::vector<std::string> key_order_;
    std::vector<GGUFTensor> tensors_;
    std::map<std::string, size_t> tensor_index_;
};

}  // namespace x2l
