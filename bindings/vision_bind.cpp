// Bindings for the vision encoder: _core.VisionEncoder.from_gguf(path, n_threads=0, device=-1).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>

#include <memory>
#include <mutex>

#include "backends.h"
#include "core/common.h"
#include "core/gguf.h"
#include "core/threadpool.h"
#include "cpu/features.h"
#include "session_lock.h"
#include "vision/executor.h"
#include "vision/qwen.h"
#include "vision/vision.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Owns everything the encoder points into (the mapping) or needs (the pool), and the executor that
// runs it (on the CPU or a device). One call computes at a time: the pool is not re-entrant and the
// GIL is released while it runs.
struct PyVisionEncoder {
    std::unique_ptr<x2l::GGUFFile> file;
    std::unique_ptr<x2l::VisionEncoder> enc;
    std::unique_ptr<x2l::ThreadPool> pool;
    std::unique_ptr<x2l::VisionExecutor> exec;
    std::mutex mu;
};

using PixelArray = nb::ndarray<nb::numpy, const float, nb::c_contig>;

nb::ndarray<nb::numpy, float> to_numpy(std::vector<float>&& v, size_t rows, size_t cols) {
    auto* heap = new std::vector<float>(std::move(v));
    nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    size_t shape[2] = {rows, cols};
    return nb::ndarray<nb::numpy, float>(heap->data(), 2, shape, owner);
}

// Runs fn(interrupt) with the GIL released and mu held. With a session, its lock is taken first
// (call_locked: the session's cancel and, on the main thread, Ctrl-C stop the encoding between layers)
// and fn polls the session's interrupt; the lock order is GIL -> session -> mu everywhere.
template <class F>
void encode_locked(std::mutex& mu, x2l::LlmSession* session, F&& fn) {
    if (session) {
        x2l_bind::call_locked(*session, [&] {
            std::lock_guard<std::mutex> lock(mu);
            fn(&session->interrupt());
        });
        return;
    }
    nb::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(mu);
    fn(nullptr);
}

nb::ndarray<nb::numpy, float> run(PyVisionEncoder& self, const PixelArray& px, x2l::VisionEncoder::Stage stage,
                                  x2l::LlmSession* session) {
    const x2l::VisionConfig& c = self.enc->config();
    const size_t S = static_cast<size_t>(c.image_size);
    if (px.ndim() != 4 || px.shape(1) != 3 || px.shape(2) != S || px.shape(3) != S) {
        std::string got = "[";
        for (size_t d = 0; d < px.ndim(); ++d) got += (d ? ", " : "") + std::to_string(px.shape(d));
        throw x2l::Error("pixels must have shape [n_frames, 3, " + std::to_string(S) + ", " + std::to_string(S) +
                         "], got " + got + "]");
    }
    const int64_t n = static_cast<int64_t>(px.shape(0));
    const int64_t rows = n * self.enc->rows_per_frame(stage), cols = self.enc->cols(stage);
    std::vector<float> out(static_cast<size_t>(rows * cols));
    encode_locked(self.mu, session, [&](const x2l::Interrupt* interrupt) {
        self.exec->encode(px.data(), n, out.data(), stage, interrupt);
    });
    return to_numpy(std::move(out), static_cast<size_t>(rows), static_cast<size_t>(cols));
}

const char* kind_name(x2l::VisionKind k) {
    switch (k) {
        case x2l::VisionKind::Siglip: return "siglip";
        case x2l::VisionKind::Clip: return "clip";
        case x2l::VisionKind::InternViT: return "internvit";
    }
    return "?";
}
const char* projector_name(x2l::ProjectorKind p) {
    switch (p) {
        case x2l::ProjectorKind::Mlp: return "mlp";
        case x2l::ProjectorKind::PixelShuffle: return "pixel_shuffle";
        case x2l::ProjectorKind::ShuffleMlp: return "shuffle_mlp";
    }
    return "?";
}
const char* act_name(x2l::VisionAct a) {
    switch (a) {
        case x2l::VisionAct::GeluTanh: return "gelu_tanh";
        case x2l::VisionAct::QuickGelu: return "quick_gelu";
        case x2l::VisionAct::GeluErf: return "gelu";
    }
    return "?";
}
const char* pool_name(x2l::PoolMode p) {
    switch (p) {
        case x2l::PoolMode::None: return "none";
        case x2l::PoolMode::Bilinear: return "bilinear";
        case x2l::PoolMode::Avg: return "avg";
    }
    return "?";
}

// Qwen2-VL / Qwen2.5-VL's tower (variable frame size, frames paired in time); CPU only.
struct PyQwenVision {
    std::unique_ptr<x2l::GGUFFile> file;
    std::unique_ptr<x2l::QwenVisionEncoder> enc;
    std::unique_ptr<x2l::ThreadPool> pool;
    std::mutex mu;
};

}  // namespace

void bind_vision(nb::module_& m) {
    nb::class_<PyQwenVision>(m, "QwenVision")
        .def_static("from_gguf", [](const std::string& path, int n_threads) {
            if (n_threads < 0) throw x2l::Error("n_threads must be >= 0");
            auto self = std::make_unique<PyQwenVision>();
            nb::gil_scoped_release nogil;
            self->file = x2l::GGUFFile::open(path);
            self->enc = x2l::QwenVisionEncoder::load(*self->file);
            self->pool = std::make_unique<x2l::ThreadPool>(n_threads > 0 ? n_threads : x2l::default_threads());
            return self;
        }, "path"_a, "n_threads"_a = 0,
           "Load a Qwen2-VL / Qwen2.5-VL vision tower + merger (an mmproj.gguf or a merged file) on the CPU.")
        .def_static("handles", [](const std::string& path) {
            std::unique_ptr<x2l::GGUFFile> f = x2l::GGUFFile::open(path);
            return x2l::QwenVisionEncoder::handles(*f);
        }, "path"_a, "Whether the file's clip.projector_type is one of Qwen's mergers.")
        .def("encode", [](PyQwenVision& s, const PixelArray& px, x2l::LlmSession* session) {
            if (px.ndim() != 4 || px.shape(1) != 3) throw x2l::Error("frames must have shape [n_frames, 3, H, W]");
            const int64_t n = static_cast<int64_t>(px.shape(0));
            const int h = static_cast<int>(px.shape(2)), w = static_cast<int>(px.shape(3));
            const int64_t rows = s.enc->n_tokens(n, h, w), cols = s.enc->config().n_embd;
            std::vector<float> out(static_cast<size_t>(rows * cols));
            encode_locked(s.mu, session, [&](const x2l::Interrupt* interrupt) {
                s.enc->encode(*s.pool, px.data(), n, h, w, out.data(), interrupt);
            });
            return to_numpy(std::move(out), static_cast<size_t>(rows), static_cast<size_t>(cols));
        }, "frames"_a, "session"_a.none() = nb::none(),
             "frames float32 [F, 3, H, W] (normalised; H, W multiples of patch * merge) -> [ceil(F/2) * H/28 * W/28,\n"
             "n_embd] tokens (frames paired in time; per pair, one token per 2x2 merge window in raster order).\n"
             "session: an LlmSession whose cancel() (and Ctrl-C) stops the encoding between blocks (CancelledError).")
        .def_prop_ro("weight_bytes", [](const PyQwenVision& s) { return s.enc->weight_bytes(); })
        .def_prop_ro("config", [](const PyQwenVision& s) {
            const x2l::QwenVisionConfig& c = s.enc->config();
            nb::dict d;
            d["kind"] = c.qwen25 ? "qwen25vl" : "qwen2vl";
            d["patch_size"] = c.patch;
            d["merge"] = c.merge;
            d["temporal_patch"] = c.temporal;
            d["width"] = c.width;
            d["n_ff"] = c.n_ff;
            d["n_head"] = c.n_head;
            d["n_layer"] = c.n_layer;
            d["n_embd"] = c.n_embd;
            d["n_wa_pattern"] = c.n_wa_pattern;
            d["window_size"] = c.window_size;
            nb::list mean, std_;
            for (float v : c.image_mean) mean.append(v);
            for (float v : c.image_std) std_.append(v);
            d["image_mean"] = mean;
            d["image_std"] = std_;
            return d;
        });

    using Stage = x2l::VisionEncoder::Stage;
    nb::class_<PyVisionEncoder>(m, "VisionEncoder")
        .def_static("from_gguf", [](const std::string& path, int n_threads, int device) {
            if (n_threads < 0) throw x2l::Error("n_threads must be >= 0");
            if (device < -1) throw x2l::Error("device must be -1 (CPU) or a CUDA device index");
            auto self = std::make_unique<PyVisionEncoder>();
            nb::gil_scoped_release nogil;
            self->file = x2l::GGUFFile::open(path);
            self->enc = x2l::VisionEncoder::load(*self->file);
            self->pool = std::make_unique<x2l::ThreadPool>(n_threads > 0 ? n_threads : x2l::default_threads());
            self->exec = x2l::make_vision_executor(*self->enc, *self->pool, device);
            return self;
        }, "path"_a, "n_threads"_a = 0, "device"_a = -1,
           "Load the vision tower and projector of a GGUF file (FormatError when it has none). device >= 0 runs\n"
           "encode / hidden_states / projected on that CUDA device (Error when its kernels cannot read a weight,\n"
           "BudgetError when it does not fit).")
        .def("encode", [](PyVisionEncoder& s, const PixelArray& px, x2l::LlmSession* session) {
            return run(s, px, Stage::Pooled, session);
        }, "pixels"_a, "session"_a.none() = nb::none(),
             "pixels float32 [F, 3, S, S] (resized, normalised) -> [F * tokens_per_frame, n_embd] frame tokens.\n"
             "session: an LlmSession whose cancel() (and Ctrl-C) stops the encoding between layers (CancelledError).")
        .def("hidden_states", [](PyVisionEncoder& s, const PixelArray& px) { return run(s, px, Stage::Features, nullptr); },
             "pixels"_a, "Selected encoder features (CLS dropped when the model drops it): [F * n_feat, width].")
        .def("projected", [](PyVisionEncoder& s, const PixelArray& px) { return run(s, px, Stage::Projected, nullptr); },
             "pixels"_a, "Projector output before pooling: [F * n_feat, n_embd] (pixel shuffle: [F * tokens_per_frame, n_embd]).")
        .def_prop_ro("tokens_per_frame", [](const PyVisionEncoder& s) { return s.enc->tokens_per_frame(); })
        .def_prop_ro("n_embd", [](const PyVisionEncoder& s) { return s.enc->n_embd_out(); })
        .def_prop_ro("n_threads", [](const PyVisionEncoder& s) { return s.pool->n_threads(); })
        .def_prop_ro("weight_bytes", [](const PyVisionEncoder& s) { return s.enc->weight_bytes(); })
        .def_prop_rw("batch_frames", [](const PyVisionEncoder& s) { return s.exec->batch_frames(); },
                     [](PyVisionEncoder& s, int n) {
                         nb::gil_scoped_release nogil;  // a device reallocates its activations
                         std::lock_guard<std::mutex> lock(s.mu);
                         s.exec->set_batch_frames(n);
                     }, "Frames encoded together per internal batch (bounds activation memory).")
        .def_prop_ro("device", [](const PyVisionEncoder& s) { return s.exec->device(); },
                     "Where encode() runs: 'cpu' or 'cuda:N'.")
        .def_prop_ro("device_bytes", [](const PyVisionEncoder& s) { return s.exec->device_bytes(); },
                     "Device memory held (weights + one batch of activations); 0 on the CPU.")
        .def_prop_ro("image_newline", [](const PyVisionEncoder& s) -> nb::object {
            const std::vector<float>& nl = s.enc->image_newline();
            if (nl.empty()) return nb::none();
            std::vector<float> copy(nl);
            auto* heap = new std::vector<float>(std::move(copy));
            nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
            size_t shape[1] = {heap->size()};
            return nb::cast(nb::ndarray<nb::numpy, float>(heap->data(), 1, shape, owner));
        })
        .def_prop_ro("config", [](const PyVisionEncoder& s) {
            const x2l::VisionConfig& c = s.enc->config();
            nb::dict d;
            d["kind"] = kind_name(c.kind);
            d["act"] = act_name(c.act);
            d["image_size"] = c.image_size;
            d["patch_size"] = c.patch_size;
            d["grid"] = c.grid;
            d["n_patches"] = c.n_patches;
            d["n_tokens"] = c.n_tokens;
            d["width"] = c.width;
            d["n_ff"] = c.n_ff;
            d["n_head"] = c.n_head;
            d["head_dim"] = c.head_dim;
            d["n_layer_stored"] = c.n_layer_stored;
            d["select_layer"] = c.select_layer;
            d["n_layer_run"] = c.n_layer_run;
            d["eps"] = c.eps;
            d["has_cls"] = c.has_cls;
            d["drop_cls"] = c.drop_cls;
            d["n_feat"] = c.n_feat;
            d["n_embd"] = c.n_embd;
            d["pool"] = pool_name(c.pool);
            d["pool_stride"] = c.pool_stride;
            d["pool_grid"] = c.pool_grid;
            d["tokens_per_frame"] = c.tokens_per_frame;
            d["projector"] = projector_name(c.projector);
            d["scale_factor"] = c.shuffle;
            d["post_norm"] = c.post_norm;
            d["pre_norm"] = c.pre_norm;
            d["rms_norm"] = c.rms_norm;
            d["layer_scale"] = c.layer_scale;
            d["qk_norm"] = c.qk_norm;
            nb::list mean, std_;
            for (float v : c.image_mean) mean.append(v);
            for (float v : c.image_std) std_.append(v);
            d["image_mean"] = mean;
            d["image_std"] = std_;
            d["resize"] = c.resize;
            d["resample"] = c.resample;
            d["newline"] = c.newline;
            d["has_image_newline"] = !s.enc->image_newline().empty();
            return d;
        });
}
