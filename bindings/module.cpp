// x2l_edge._core: the thin nanobind layer over the C++ core (the user API; kernel probes live in the
// test module, bindings/testing). numpy arrays in and out; the GIL is released around every call that
// computes.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstring>

#include "common.h"
#include "core/common.h"
#include "core/gguf.h"
#include "llm/tokenizer.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

nb::object gguf_value_to_py(const x2l::GGUFValue& v) {
    using T = x2l::GGUFType;
    switch (v.type) {
        case T::UINT8: case T::UINT16: case T::UINT32: case T::UINT64: return nb::int_(v.u);
        case T::INT8: case T::INT16: case T::INT32: case T::INT64: return nb::int_(v.i);
        case T::FLOAT32: case T::FLOAT64: return nb::float_(v.f);
        case T::BOOL: return nb::bool_(v.i != 0);
        case T::STRING: return nb::str(v.str.c_str(), v.str.size());
        case T::ARRAY: {
            nb::list out;
            if (v.arr_type == T::STRING) {
                for (auto& s : v.arr_str) out.append(nb::str(s.c_str(), s.size()));
            } else if (v.arr_type == T::ARRAY) {
                for (auto& e : v.arr_nested) out.append(gguf_value_to_py(e));
            } else if (v.arr_type == T::FLOAT32 || v.arr_type == T::FLOAT64) {
                for (double d : v.arr_float) out.append(nb::float_(d));
            } else if (v.arr_type == T::BOOL) {
                for (int64_t d : v.arr_int) out.append(nb::bool_(d != 0));
            } else {
                for (int64_t d : v.arr_int) out.append(nb::int_(d));
            }
            return out;
        }
    }
    return nb::none();
}

}  // namespace

void bind_session(nb::module_& m);  // session_bind.cpp
void bind_x2l(nb::module_& m);      // x2l_bind.cpp
void bind_device(nb::module_& m);   // device_bind.cpp
void bind_vision(nb::module_& m);   // vision_bind.cpp

NB_MODULE(_core, m) {
    m.doc() = "x2l-edge native core";

    // Error is the base of every core exception; FormatError is also a ValueError and BudgetError
    // also a MemoryError, so callers can catch either the project's or Python's usual classes.
    PyObject* error = PyErr_NewException("x2l_edge._core.Error", PyExc_RuntimeError, nullptr);
    PyObject* format_bases = PyTuple_Pack(2, error, PyExc_ValueError);
    PyObject* format_error = PyErr_NewException("x2l_edge._core.FormatError", format_bases, nullptr);
    Py_DECREF(format_bases);
    PyObject* budget_bases = PyTuple_Pack(2, error, PyExc_MemoryError);
    PyObject* budget_error = PyErr_NewException("x2l_edge._core.BudgetError", budget_bases, nullptr);
    Py_DECREF(budget_bases);
    PyObject* cancelled_error = PyErr_NewException("x2l_edge._core.CancelledError", error, nullptr);
    m.attr("Error") = nb::steal(error);
    m.attr("CancelledError") = nb::steal(cancelled_error);
    m.attr("FormatError") = nb::steal(format_error);
    m.attr("BudgetError") = nb::steal(budget_error);
    x2l_bind::translate_errors(m);

    // ------------------------------------------------------------------ GGUF
    nb::class_<x2l::GGUFFile>(m, "GGUFFile")
        .def_static("open", [](const std::string& path) {
            nb::gil_scoped_release nogil;
            return x2l::GGUFFile::open(path);
        }, "path"_a)
        .def_static("from_bytes", [](nb::bytes data) {
            return x2l::GGUFFile::from_bytes(reinterpret_cast<const uint8_t*>(data.c_str()), data.size());
        }, "data"_a)
        .def_prop_ro("version", &x2l::GGUFFile::version)
        .def_prop_ro("alignment", &x2l::GGUFFile::alignment)
        .def("keys", &x2l::GGUFFile::keys)
        .def("get", [](const x2l::GGUFFile& f, const std::string& key) -> nb::object {
            const x2l::GGUFValue* v = f.find(key);
            return v ? gguf_value_to_py(*v) : nb::none();
        }, "key"_a)
        .def("value_type", [](const x2l::GGUFFile& f, const std::string& key) -> nb::object {
            const x2l::GGUFValue* v = f.find(key);
            if (!v) return nb::none();
            return nb::str(x2l::gguf_type_name(v->type));
        }, "key"_a)
        .def("tensors", [](const x2l::GGUFFile& f) {
            nb::list out;
            for (auto& t : f.tensors()) {
                nb::list shape;
                for (int d = 0; d < t.n_dims; ++d) shape.append(t.ne[d]);
                out.append(nb::make_tuple(t.name, shape, static_cast<uint32_t>(t.type), t.offset, t.nbytes));
            }
            return out;
        }, "List of (name, ne (ggml order), type id, offset, nbytes).")
        .def("tensor_bytes", [](const x2l::GGUFFile& f, const std::string& name) {
            const x2l::GGUFTensor* t = f.find_tensor(name);
            if (!t) throw x2l::FormatError("no tensor named '" + name + "'");
            return nb::bytes(reinterpret_cast<const char*>(t->data), t->nbytes);
        }, "name"_a);

    // ------------------------------------------------------------------ quant formats
    m.def("type_name", [](uint32_t type_id) { return std::string(x2l::type_info(x2l_bind::checked_type(type_id)).name); });
    m.def("type_block", [](uint32_t type_id) {
        const auto& ti = x2l::type_info(x2l_bind::checked_type(type_id));
        return nb::make_tuple(ti.block_size, ti.block_bytes);
    });
    m.def("dequantize", &x2l_bind::dequantize, "type_id"_a, "data"_a, "n"_a, "Dequantize a row of n values to float32.");
    m.def("quantize", &x2l_bind::quantize, "type_id"_a, "x"_a, "Quantize float32 values to a row of the given type.");

    // ------------------------------------------------------------------ tokenizer
    nb::class_<x2l::Tokenizer>(m, "Tokenizer")
        .def_static("from_gguf", [](const std::string& path) {
            auto f = x2l::GGUFFile::open(path);
            return x2l::Tokenizer::from_gguf(*f);
        }, "path"_a)
        .def("encode", [](const x2l::Tokenizer& tok, const std::string& text, bool parse_special, bool add_bos) {
            nb::gil_scoped_release nogil;
            return tok.encode(text, parse_special, add_bos);
        }, "text"_a, "parse_special"_a = true, "add_bos"_a = false)
        .def("decode", [](const x2l::Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
            std::string s = tok.decode(ids, skip_special);
            return nb::bytes(s.data(), s.size());
        }, "ids"_a, "skip_special"_a = false)
        .def("token_bytes", [](const x2l::Tokenizer& tok, int32_t id) {
            std::string s = tok.token_bytes(id);
            return nb::bytes(s.data(), s.size());
        })
        .def_prop_ro("n_vocab", &x2l::Tokenizer::n_vocab)
        .def_ro("bos_id", &x2l::Tokenizer::bos_id)
        .def_ro("eos_id", &x2l::Tokenizer::eos_id)
        .def_ro("eot_id", &x2l::Tokenizer::eot_id)
        .def_ro("pre_type", &x2l::Tokenizer::pre_type);

    bind_session(m);
    bind_x2l(m);
    bind_device(m);
    bind_vision(m);
}
