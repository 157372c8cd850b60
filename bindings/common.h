// Helpers shared by the user module (x2l_edge._core) and the test module (x2l_edge._testing).
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstring>
#include <string>
#include <vector>

#include "core/common.h"
#include "core/formats.h"
#include "cpu/quant.h"

namespace x2l_bind {

// x2l exceptions become the Python classes that `owner` (x2l_edge._core) defines: FormatError (also a
// ValueError), BudgetError (also a MemoryError), CancelledError (a call stopped by cancel()), Error (a
// RuntimeError). Messages may quote bytes from a
// broken file: they are decoded leniently so raising never fails.
inline void translate_errors(nanobind::handle owner) {
    nanobind::register_exception_translator([](const std::exception_ptr& p, void* mod) {
        nanobind::handle module(static_cast<PyObject*>(mod));
        auto set = [&](const char* cls, const char* msg) {
            PyObject* s = PyUnicode_DecodeUTF8(msg, static_cast<Py_ssize_t>(std::strlen(msg)), "replace");
            PyErr_SetObject(module.attr(cls).ptr(), s);
            Py_XDECREF(s);
        };
        try {
            std::rethrow_exception(p);
        } catch (const x2l::FormatError& e) {
            set("FormatError", e.what());
        } catch (const x2l::BudgetError& e) {
            set("BudgetError", e.what());
        } catch (const x2l::FileError& e) {
            // OSError(errno, msg, path) is created as its subclass: FileNotFoundError, IsADirectoryError, ...
            PyObject* err = PyObject_CallFunction(PyExc_OSError, "isN", e.err(), e.what(),
                                                  PyUnicode_DecodeFSDefault(e.path().c_str()));
            if (err) {
                PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err)), err);
                Py_DECREF(err);
            }
        } catch (const x2l::Cancelled& e) {
            set("CancelledError", e.what());
        } catch (const x2l::Error& e) {
            set("Error", e.what());
        }
    }, owner.ptr());
}

inline x2l::DType checked_type(uint32_t type_id) {
    const x2l::TypeInfo* ti = x2l::type_info(type_id);
    if (!ti) throw x2l::FormatError("unknown tensor type id " + std::to_string(type_id));
    return static_cast<x2l::DType>(type_id);
}

template <typename T>
nanobind::ndarray<nanobind::numpy, T> owned_array(std::vector<T>&& v, std::initializer_list<size_t> shape) {
    auto* heap = new std::vector<T>(std::move(v));
    nanobind::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
    return nanobind::ndarray<nanobind::numpy, T>(heap->data(), shape.size(), shape.begin(), owner);
}

// dequantize(type_id, data, n) / quantize(type_id, x): one row of a GGUF tensor type and float32.
inline nanobind::ndarray<nanobind::numpy, float> dequantize(uint32_t type_id, nanobind::bytes data, int64_t n) {
    x2l::DType t = checked_type(type_id);
    if (!x2l::type_info(t).compute) throw x2l::FormatError(std::string("unsupported type ") + x2l::type_info(t).name);
    const auto& ti = x2l::type_info(t);
    if (n < 0 || n % ti.block_size != 0) throw x2l::Error("n must be a multiple of the block size");
    if (x2l::row_bytes(t, n) != data.size()) throw x2l::Error("data size does not match n");
    std::vector<float> out(static_cast<size_t>(n));
    {
        nanobind::gil_scoped_release nogil;
        x2l::dequantize_row(t, data.c_str(), out.data(), n);
    }
    return owned_array(std::move(out), {static_cast<size_t>(n)});
}

inline nanobind::bytes quantize(uint32_t type_id, nanobind::ndarray<nanobind::numpy, float, nanobind::c_contig> x) {
    x2l::DType t = checked_type(type_id);
    int64_t n = static_cast<int64_t>(x.size());
    const auto& ti = x2l::type_info(t);
    if (n % ti.block_size != 0) throw x2l::Error("n must be a multiple of the block size");
    std::string out(x2l::row_bytes(t, n), '\0');
    {
        nanobind::gil_scoped_release nogil;
        x2l::quantize_row(t, x.data(), out.data(), n);
    }
    return nanobind::bytes(out.data(), out.size());
}

}  // namespace x2l_bind
