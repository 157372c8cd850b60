#include "core/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <sstream>

#include "core/common.h"

namespace x2l {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
// Hard caps that keep a hostile header from making us allocate or loop without bound.
constexpr uint64_t kMaxStringLen = 1ull << 30;
constexpr uint64_t kMaxArrayLen = 1ull << 31;
constexpr int kMaxArrayDepth = 4;

// GGUF strings are UTF-8; rejecting anything else keeps bad bytes out of names and messages.
bool valid_utf8(const std::string& s) {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(s.data());
    size_t n = s.size(), i = 0;
    while (i < n) {
        unsigned char c = p[i];
        if (c < 0x80) { ++i; continue; }
        int len = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        if (len == 0 || i + len > n) return false;
        uint32_t cp = c & (0xFF >> (len + 1));
        for (int k = 1; k < len; ++k) {
            if ((p[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF)) {
            return false;
        }
        i += len;
    }
    return true;
}

// Bounds-checked little-endian cursor over the mapping.
class Cursor {
  public:
    Cursor(const uint8_t* base, size_t size) : base_(base), size_(size) {}
    size_t pos() const { return pos_; }
    size_t remaining() const { return size_ - pos_; }

    void need(size_t n, const char* what) const {
        if (n > remaining()) {
            std::ostringstream os;
            os << "truncated file: need " << n << " bytes for " << what << " at offset " << pos_
               << ", file has " << size_ << " bytes";
            throw FormatError(os.str());
        }
    }
    template <typename T>
    T read(const char* what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, base_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::string read_string(const char* what) {
        uint64_t len = read<uint64_t>(what);
        if (len > kMaxStringLen) throw FormatError(std::string("string length out of range for ") + what);
        need(static_cast<size_t>(len), what);
        std::string s(reinterpret_cast<const char*>(base_ + pos_), static_cast<size_t>(len));
        if (!valid_utf8(s)) throw FormatError(std::string("invalid UTF-8 in ") + what + " at offset " + std::to_string(pos_));
        pos_ += static_cast<size_t>(len);
        return s;
    }

  private:
    const uint8_t* base_;
    size_t size_;
    size_t pos_ = 0;
};

size_t scalar_size(GGUFType t) {
    switch (t) {
        case GGUFType::UINT8: case GGUFType::INT8: case GGUFType::BOOL: return 1;
        case GGUFType::UINT16: case GGUFType::INT16: return 2;
        case GGUFType::UINT32: case GGUFType::INT32: case GGUFType::FLOAT32: return 4;
        case GGUFType::UINT64: case GGUFType::INT64: case GGUFType::FLOAT64: return 8;
        default: return 0;
    }
}

bool valid_value_type(uint32_t t) { return t <= static_cast<uint32_t>(GGUFType::FLOAT64); }

// Reads one scalar of type t into v's scalar fields.
void read_scalar(Cursor& c, GGUFType t, GGUFValue& v, const std::string& key) {
    const char* what = key.c_str();
    switch (t) {
        case GGUFType::UINT8: v.u = c.read<uint8_t>(what); v.i = static_cast<int64_t>(v.u); break;
        case GGUFType::INT8: v.i = c.read<int8_t>(what); v.u = static_cast<uint64_t>(v.i); break;
        case GGUFType::UINT16: v.u = c.read<uint16_t>(what); v.i = static_cast<int64_t>(v.u); break;
        case GGUFType::INT16: v.i = c.read<int16_t>(what); v.u = static_cast<uint64_t>(v.i); break;
        case GGUFType::UINT32: v.u = c.read<uint32_t>(what); v.i = static_cast<int64_t>(v.u); break;
        case GGUFType::INT32: v.i = c.read<int32_t>(what); v.u = static_cast<uint64_t>(v.i); break;
        case GGUFType::UINT64: v.u = c.read<uint64_t>(what); v.i = static_cast<int64_t>(v.u); break;
        case GGUFType::INT64: v.i = c.read<int64_t>(what); v.u = static_cast<uint64_t>(v.i); break;
        case GGUFType::FLOAT32: v.f = c.read<float>(what); break;
        case GGUFType::FLOAT64: v.f = c.read<double>(what); break;
        case GGUFType::BOOL: {
            uint8_t b = c.read<uint8_t>(what);
            if (b > 1) throw FormatError("invalid bool value for key '" + key + "'");
            v.i = b; v.u = b;
            break;
        }
        case GGUFType::STRING: v.str = c.read_string(what); break;
        default: throw FormatError("invalid scalar type for key '" + key + "'");
    }
}

void read_value(Cursor& c, GGUFType t, GGUFValue& v, const std::string& key, int depth) {
    v.type = t;
    if (t != GGUFType::ARRAY) {
        read_scalar(c, t, v, key);
        return;
    }
    if (depth >= kMaxArrayDepth) throw FormatError("arrays nested too deeply in key '" + key + "'");
    uint32_t et = c.read<uint32_t>(key.c_str());
    if (!valid_value_type(et)) {
        throw FormatError("unknown array element type " + std::to_string(et) + " in key '" + key + "'");
    }
    v.arr_type = static_cast<GGUFType>(et);
    uint64_t n = c.read<uint64_t>(key.c_str());
    if (n > kMaxArrayLen) throw FormatError("array length out of range in key '" + key + "'");
    v.arr_len = n;
    // Every element takes at least one byte (strings eight): reject impossible lengths before reserving.
    size_t min_elem = v.arr_type == GGUFType::STRING ? 8 : (v.arr_type == GGUFType::ARRAY ? 12 : scalar_size(v.arr_type));
    if (n > c.remaining() / (min_elem ? min_elem : 1)) {
        throw FormatError("truncated file: array in key '" + key + "' claims " + std::to_string(n) + " elements");
    }
    GGUFValue tmp;
    switch (v.arr_type) {
        case GGUFType::STRING:
            v.arr_str.reserve(n);
            for (uint64_t k = 0; k < n; ++k) v.arr_str.push_back(c.read_string(key.c_str()));
            break;
        case GGUFType::ARRAY:
            v.arr_nested.resize(n);
            for (uint64_t k = 0; k < n; ++k) read_value(c, GGUFType::ARRAY, v.arr_nested[k], key, depth + 1);
            break;
        case GGUFType::FLOAT32: case GGUFType::FLOAT64:
            v.arr_float.reserve(n);
            for (uint64_t k = 0; k < n; ++k) {
                read_scalar(c, v.arr_type, tmp, key);
                v.arr_float.push_back(tmp.f);
            }
            break;
        default:
            v.arr_int.reserve(n);
            for (uint64_t k = 0; k < n; ++k) {
                read_scalar(c, v.arr_type, tmp, key);
                v.arr_int.push_back(tmp.i);
            }
            break;
    }
}

}  // namespace

const char* gguf_type_name(GGUFType t) {
    static const char* names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                  "bool", "string", "array", "uint64", "int64", "float64"};
    uint32_t i = static_cast<uint32_t>(t);
    return i < 13 ? names[i] : "invalid";
}

bool GGUFValue::is_int() const {
    switch (type) {
        case GGUFType::UINT8: case GGUFType::INT8: case GGUFType::UINT16: case GGUFType::INT16:
        case GGUFType::UINT32: case GGUFType::INT32: case GGUFType::UINT64: case GGUFType::INT64:
        case GGUFType::BOOL:
            return true;
        default:
            return false;
    }
}
bool GGUFValue::is_float() const { return type == GGUFType::FLOAT32 || type == GGUFType::FLOAT64; }

std::string GGUFTensor::shape_str() const {
    std::string s = "[";
    for (int d = 0; d < n_dims; ++d) s += (d ? ", " : "") + std::to_string(ne[d]);
    return s + "]";
}

std::unique_ptr<GGUFFile> GGUFFile::open(const std::string& path) {
    std::unique_ptr<GGUFFile> f(new GGUFFile());
    f->path_ = path;
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        const int err = errno;
        throw FileError(err, path, "cannot open '" + path + "': " + std::strerror(err));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        if (S_ISDIR(st.st_mode)) throw FileError(EISDIR, path, "'" + path + "' is a directory, not a file");
        throw Error("'" + path + "' is not a regular file");
    }
    f->size_ = static_cast<size_t>(st.st_size);
    if (f->size_ < 4) {
        ::close(fd);
        throw FormatError("'" + path + "': truncated file (" + std::to_string(f->size_) + " bytes), not a GGUF file");
    }
    void* p = mmap(nullptr, f->size_, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) throw Error("cannot mmap '" + path + "': " + std::strerror(errno));
    f->base_ = static_cast<const uint8_t*>(p);
    f->mapped_ = true;
    try {
        f->parse();
    } catch (const FormatError& e) {
        throw FormatError("'" + path + "': " + e.what());
    }
    return f;
}

std::unique_ptr<GGUFFile> GGUFFile::from_bytes(const uint8_t* data, size_t size) {
    std::unique_ptr<GGUFFile> f(new GGUFFile());
    f->path_ = "<memory>";
    // Keep at least one byte so data() is never null; size_ stays the real size.
    f->owned_.assign(data, data + size);
    f->owned_.reserve(size + 1);
    f->base_ = f->owned_.data();
    f->size_ = size;
    f->parse();
    return f;
}

GGUFFile::~GGUFFile() {
    if (mapped_ && base_) munmap(const_cast<uint8_t*>(base_), size_);
}

void GGUFFile::parse() {
    Cursor c(base_, size_);
    uint32_t magic = c.read<uint32_t>("magic");
    if (magic != kMagic) throw FormatError("bad magic: not a GGUF file");
    version_ = c.read<uint32_t>("version");
    if (version_ == 1) throw FormatError("GGUF version 1 is not supported (re-convert the model)");
    if (version_ != 2 && version_ != 3) throw FormatError("unsupported GGUF version " + std::to_string(version_));
    uint64_t n_tensors = c.read<uint64_t>("tensor count");
    uint64_t n_kv = c.read<uint64_t>("metadata count");
    // A tensor info is at least 8+4+8+4+8 bytes and a key/value at least 8+4+1.
    if (n_tensors > c.remaining() / 32) throw FormatError("truncated file or bad header: tensor count " + std::to_string(n_tensors) + " exceeds the file size");
    if (n_kv > c.remaining() / 13) throw FormatError("truncated file or bad header: metadata count " + std::to_string(n_kv) + " exceeds the file size");

    for (uint64_t k = 0; k < n_kv; ++k) {
        std::string key = c.read_string("metadata key");
        uint32_t t = c.read<uint32_t>("metadata value type");
        if (!valid_value_type(t)) throw FormatError("unknown metadata value type " + std::to_string(t) + " for key '" + key + "'");
        GGUFValue v;
        read_value(c, static_cast<GGUFType>(t), v, key, 0);
        if (kv_.count(key)) throw FormatError("duplicate metadata key '" + key + "'");
        key_order_.push_back(key);
        kv_.emplace(key, std::move(v));
    }

    if (const GGUFValue* a = find("general.alignment")) {
        if (!a->is_int() || a->u == 0 || a->u > (1u << 20) || (a->u & (a->u - 1)) != 0) {
            throw FormatError("general.alignment must be a power of two (got " + std::to_string(a->i) + ")");
        }
        alignment_ = static_cast<size_t>(a->u);
    }

    tensors_.reserve(n_tensors);
    for (uint64_t k = 0; k < n_tensors; ++k) {
        GGUFTensor t;
        t.name = c.read_string("tensor name");
        uint32_t nd = c.read<uint32_t>("tensor dimension count");
        if (nd < 1 || nd > 4) throw FormatError("tensor '" + t.name + "' has " + std::to_string(nd) + " dimensions (1..4 allowed)");
        t.n_dims = static_cast<int>(nd);
        for (uint32_t d = 0; d < nd; ++d) {
            int64_t ne = c.read<int64_t>("tensor shape");
            if (ne <= 0 || ne > (int64_t(1) << 40)) throw FormatError("tensor '" + t.name + "' has an invalid dimension " + std::to_string(ne));
            t.ne[d] = ne;
        }
        uint32_t type_id = c.read<uint32_t>("tensor type");
        const TypeInfo* ti = type_info(type_id);
        if (!ti) throw FormatError("tensor '" + t.name + "' has unknown type id " + std::to_string(type_id));
        t.type = static_cast<DType>(type_id);
        t.offset = c.read<uint64_t>("tensor offset");
        if (t.ne[0] % ti->block_size != 0) {
            throw FormatError("tensor '" + t.name + "': row length " + std::to_string(t.ne[0]) +
                              " is not a multiple of the " + ti->name + " block size");
        }
        // Overflow-checked element count and byte size (a product of four 2^40 dimensions wraps
        // even 128-bit arithmetic): every step must stay within what the file could hold.
        uint64_t elems = 1, bytes = 0;
        for (int d = 0; d < 4; ++d) {
            if (__builtin_mul_overflow(elems, static_cast<uint64_t>(t.ne[d]), &elems)) {
                throw FormatError("tensor '" + t.name + "' " + t.shape_str() + ": element count overflows");
            }
        }
        if (__builtin_mul_overflow(elems / ti->block_size, static_cast<uint64_t>(ti->block_bytes), &bytes) ||
            bytes > size_) {
            throw FormatError("tensor '" + t.name + "' " + t.shape_str() + " needs more bytes than the file has");
        }
        t.nbytes = static_cast<size_t>(bytes);
        if (tensor_index_.count(t.name)) throw FormatError("duplicate tensor name '" + t.name + "'");
        tensor_index_[t.name] = tensors_.size();
        tensors_.push_back(std::move(t));
    }

    size_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
    if (data_start > size_ && !tensors_.empty()) throw FormatError("truncated file: tensor data section is missing");
    for (auto& t : tensors_) {
        if (t.offset % alignment_ != 0) {
            throw FormatError("tensor '" + t.name + "' offset " + std::to_string(t.offset) + " is not aligned to " + std::to_string(alignment_));
        }
        if (t.offset > size_ || data_start + t.offset > size_ || t.nbytes > size_ - data_start - t.offset) {
            std::ostringstream os;
            os << "tensor '" << t.name << "' data (offset " << t.offset << ", " << t.nbytes
               << " bytes) lies outside the file (truncated file?)";
            throw FormatError(os.str());
        }
        t.data = base_ + data_start + t.offset;
    }
}

const GGUFValue* GGUFFile::find(const std::string& key) const {
    auto it = kv_.find(key);
    return it == kv_.end() ? nullptr : &it->second;
}

namespace {
[[noreturn]] void missing(const std::string& key) { throw FormatError("missing required metadata key '" + key + "'"); }
[[noreturn]] void wrong_type(const std::string& key, const GGUFValue& v, const char* want) {
    throw FormatError("metadata key '" + key + "' has type " + gguf_type_name(v.type) + ", expected " + want);
}
}  // namespace

std::string GGUFFile::get_str(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) missing(key);
    if (v->type != GGUFType::STRING) wrong_type(key, *v, "string");
    return v->str;
}
std::string GGUFFile::get_str(const std::string& key, const std::string& dflt) const {
    return has(key) ? get_str(key) : dflt;
}
int64_t GGUFFile::get_int(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) missing(key);
    if (!v->is_int()) wrong_type(key, *v, "integer");
    return v->i;
}
int64_t GGUFFile::get_int(const std::string& key, int64_t dflt) const { return has(key) ? get_int(key) : dflt; }
double GGUFFile::get_float(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) missing(key);
    if (v->is_float()) return v->f;
    if (v->is_int()) return static_cast<double>(v->i);
    wrong_type(key, *v, "number");
}
double GGUFFile::get_float(const std::string& key, double dflt) const { return has(key) ? get_float(key) : dflt; }
bool GGUFFile::get_bool(const std::string& key, bool dflt) const {
    const GGUFValue* v = find(key);
    if (!v) return dflt;
    if (!v->is_int()) wrong_type(key, *v, "bool");
    return v->i != 0;
}
const std::vector<std::string>& GGUFFile::get_str_array(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) missing(key);
    if (v->type != GGUFType::ARRAY || v->arr_type != GGUFType::STRING) wrong_type(key, *v, "array of strings");
    return v->arr_str;
}
std::vector<int64_t> GGUFFile::get_int_array(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) missing(key);
    if (v->type != GGUFType::ARRAY || v->arr_type == GGUFType::STRING || v->arr_type == GGUFType::ARRAY ||
        v->arr_type == GGUFType::FLOAT32 || v->arr_type == GGUFType::FLOAT64) {
        wrong_type(key, *v, "array of integers");
    }
    return v->arr_int;
}
std::vector<double> GGUFFile::get_float_array(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) missing(key);
    if (v->type != GGUFType::ARRAY) wrong_type(key, *v, "array of numbers");
    if (v->arr_type == GGUFType::FLOAT32 || v->arr_type == GGUFType::FLOAT64) return v->arr_float;
    if (v->arr_type == GGUFType::STRING || v->arr_type == GGUFType::ARRAY) wrong_type(key, *v, "array of numbers");
    return std::vector<double>(v->arr_int.begin(), v->arr_int.end());
}

const GGUFTensor* GGUFFile::find_tensor(const std::string& name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GGUFTensor& GGUFFile::require_tensor(const std::string& name, std::vector<int64_t> ne) const {
    const GGUFTensor* t = find_tensor(name);
    if (!t) throw FormatError("missing required tensor '" + name + "'");
    if (!ne.empty()) {
        bool ok = true;
        for (size_t d = 0; d < 4; ++d) {
            int64_t want = d < ne.size() ? ne[d] : 1;
            if (want >= 0 && t->ne[d] != want) ok = false;
        }
        if (!ok) {
            std::string want = "[";
            for (size_t d = 0; d < ne.size(); ++d) want += (d ? ", " : "") + std::to_string(ne[d]);
            throw FormatError("tensor '" + name + "' has shape " + t->shape_str() + ", expected " + want + "]");
        }
    }
    return *t;
}

}  // namespace x2l
