// Bindings for the LLM session and the sampler.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "backends.h"
#include "core/common.h"
#include "cpu/features.h"
#include "llm/session.h"
#include "numpy_util.h"
#include "session_lock.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

x2l::DType kv_type_from_name(const std::string& s) {
    if (s == "f32") return x2l::DType::F32;
    if (s == "f16") return x2l::DType::F16;
    if (s == "q8_0") return x2l::DType::Q8_0;
    if (s == "q4_0") return x2l::DType::Q4_0;
    throw x2l::Error("kv_type must be one of f32, f16, q8_0, q4_0 (got '" + s + "')");
}


}  // namespace

void bind_session(nb::module_& m) {
    m.def("cpu_features", &x2l::cpu_features);
    m.def("default_threads", &x2l::default_threads);

    nb::class_<x2l::Sampler>(m, "Sampler")
        .def("__init__", [](x2l::Sampler* self, float temperature, int top_k, float top_p, float min_p,
                            float repeat_penalty, int repeat_last_n, uint64_t seed) {
            x2l::SamplerParams p;
            p.temperature = temperature;
            p.top_k = top_k;
            p.top_p = top_p;
            p.min_p = min_p;
            p.repeat_penalty = repeat_penalty;
            p.repeat_last_n = repeat_last_n;
            p.seed = seed;
            new (self) x2l::Sampler(p);
        }, "temperature"_a = 0.0f, "top_k"_a = 0, "top_p"_a = 1.0f, "min_p"_a = 0.0f, "repeat_penalty"_a = 1.0f,
           "repeat_last_n"_a = 64, "seed"_a = 0)
        .def("sample", [](x2l::Sampler& s, nb::ndarray<nb::numpy, const float, nb::ndim<1>, nb::c_contig> logits,
                          const std::vector<int32_t>& history) {
            std::vector<float> l(logits.data(), logits.data() + logits.shape(0));
            return s.sample(l.data(), static_cast<int32_t>(l.size()), history.data(), static_cast<int64_t>(history.size()));
        }, "logits"_a, "history"_a = std::vector<int32_t>{});

    m.def("mrope_run_positions", [](int t, int h, int w, int merge, bool video, float seconds_per_grid,
                                    float tokens_per_second, const std::string& text_after, int32_t start,
                                    int t_begin, int t_end) {
        x2l::TextAfterMedia rule;
        if (text_after == "max") rule = x2l::TextAfterMedia::MaxPlusOne;
        else if (text_after == "spatial") rule = x2l::TextAfterMedia::Spatial;
        else throw x2l::Error("text_after must be 'max' or 'spatial'");
        if (t_end < 0) t_end = t;
        if (merge < 1 || h % merge || w % merge || t < 1 || t_begin < 0 || t_begin >= t_end || t_end > t) {
            throw x2l::Error("invalid media grid or temporal range");
        }
        // The whole run followed by one text token (where text continues), then rows [t_begin, t_end).
        const int64_t per_t = static_cast<int64_t>(h / merge) * (w / merge), n = t * per_t;
        std::vector<x2l::TokenKind> kinds(static_cast<size_t>(n) + 1, video ? x2l::TokenKind::Video : x2l::TokenKind::Image);
        kinds.back() = x2l::TokenKind::Text;
        x2l::MediaGrid g;
        g.t = t;
        g.h = h;
        g.w = w;
        g.seconds_per_grid = seconds_per_grid;
        std::vector<int32_t> all(3 * (static_cast<size_t>(n) + 1));
        try {
            x2l::mrope_positions(kinds.data(), n + 1, &g, 1, merge, tokens_per_second, rule, all.data());
        } catch (const std::invalid_argument& e) {
            throw x2l::Error(std::string("media positions: ") + e.what());
        }
        const int64_t b = t_begin * per_t, m = (t_end - t_begin) * per_t;
        std::vector<int32_t> out(static_cast<size_t>(3 * m));
        for (int a = 0; a < 3; ++a) {
            for (int64_t i = 0; i < m; ++i) out[a * m + i] = start + all[a * (n + 1) + b + i];
        }
        auto* heap = new std::vector<int32_t>(std::move(out));
        nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<int32_t>*>(p); });
        size_t shape[2] = {3, static_cast<size_t>(m)};
        return std::make_pair(nb::ndarray<nb::numpy, int32_t>(heap->data(), 2, shape, owner), start + all[n]);
    }, "t"_a, "h"_a, "w"_a, "merge"_a = 2, "video"_a = true, "seconds_per_grid"_a = 1.0f, "tokens_per_second"_a = 0.0f,
       "text_after"_a = "max", "start"_a = 0, "t_begin"_a = 0, "t_end"_a = -1,
       "M-RoPE positions [3, n] of temporal patches [t_begin, t_end) of an image/video run of patch grid (t, h, w)\n"
       "starting at `start`, and the position text takes after the whole run (transformers' get_rope_index).");

    nb::class_<x2l::LlmSession>(m, "LlmSession")
        .def("__init__", [](x2l::LlmSession* self, const std::string& path, int n_threads, int64_t n_ctx,
                            const std::string& kv_type, int64_t n_batch, int device, bool cuda_graphs) {
            x2l::SessionOptions o;
            o.device = device;
            o.cuda_graphs = cuda_graphs;
            o.n_threads = n_threads;
            o.n_ctx = n_ctx;
            o.kv_type = kv_type_from_name(kv_type);
            o.n_batch = n_batch;
            nb::gil_scoped_release nogil;
            new (self) x2l::LlmSession(path, o, x2l::make_llm_executor);
        }, "path"_a, "n_threads"_a = 0, "n_ctx"_a = 0, "kv_type"_a = "f16", "n_batch"_a = 256,
           "device"_a = -1, "cuda_graphs"_a = true)
        .def("eval", [](x2l::LlmSession& s, const std::vector<int32_t>& tokens, bool all_logits) -> nb::object {
            std::vector<float> all;
            x2l_bind::call_locked(s, [&] { s.eval(tokens, all_logits ? &all : nullptr); });
            if (!all_logits) return nb::none();
            size_t nv = static_cast<size_t>(s.model().config().n_vocab);
            return nb::cast(x2l_bind::to_numpy(std::move(all), tokens.size(), nv));
        }, "tokens"_a, "all_logits"_a = false,
           "Append tokens to the context. With all_logits, returns [n, n_vocab] float32 logits.")
        .def("eval_embd", [](x2l::LlmSession& s, nb::ndarray<const float, nb::ndim<2>, nb::c_contig> embd,
                             bool all_logits) -> nb::object {
            if (static_cast<int64_t>(embd.shape(1)) != s.model().config().n_embd) {
                throw x2l::Error("embeddings must be [n, n_embd=" + std::to_string(s.model().config().n_embd) + "]");
            }
            std::vector<float> all;
            x2l_bind::call_locked(s, [&] {
                s.eval_embd(embd.data(), static_cast<int64_t>(embd.shape(0)), all_logits ? &all : nullptr);
            });
            if (!all_logits) return nb::none();
            size_t nv = static_cast<size_t>(s.model().config().n_vocab);
            return nb::cast(x2l_bind::to_numpy(std::move(all), embd.shape(0), nv));
        }, "embd"_a, "all_logits"_a = false, "Append input embeddings [n, n_embd] (e.g. video features).")
        .def("embed_tokens", [](x2l::LlmSession& s, const std::vector<int32_t>& tokens) {
            std::vector<float> x;
            x2l_bind::call_locked(s, [&] { x = x2l::embed_tokens(s.model(), tokens); });
            return x2l_bind::to_numpy(std::move(x), tokens.size(), static_cast<size_t>(s.model().config().n_embd));
        }, "tokens"_a,
           "The input embeddings [n, n_embd] eval() would feed for these tokens (to interleave text with media rows).")
        .def("eval_media", [](x2l::LlmSession& s, nb::ndarray<const float, nb::ndim<2>, nb::c_contig> embd,
                              int t, int h, int w, bool video, int merge, float seconds_per_grid,
                              float tokens_per_second, const std::string& text_after, bool all_logits) -> nb::object {
            if (static_cast<int64_t>(embd.shape(1)) != s.model().config().n_embd) {
                throw x2l::Error("embeddings must be [n, n_embd=" + std::to_string(s.model().config().n_embd) + "]");
            }
            x2l::TextAfterMedia rule;
            if (text_after == "max") rule = x2l::TextAfterMedia::MaxPlusOne;
            else if (text_after == "spatial") rule = x2l::TextAfterMedia::Spatial;
            else throw x2l::Error("text_after must be 'max' or 'spatial'");
            x2l::MediaGrid grid;
            grid.t = t;
            grid.h = h;
            grid.w = w;
            grid.seconds_per_grid = seconds_per_grid;
            std::vector<float> all;
            x2l_bind::call_locked(s, [&] {
                s.eval_media(embd.data(), static_cast<int64_t>(embd.shape(0)), grid, video, merge, tokens_per_second,
                             rule, all_logits ? &all : nullptr);
            });
            if (!all_logits) return nb::none();
            size_t nv = static_cast<size_t>(s.model().config().n_vocab);
            return nb::cast(x2l_bind::to_numpy(std::move(all), embd.shape(0), nv));
        }, "embd"_a, "t"_a, "h"_a, "w"_a, "video"_a = false, "merge"_a = 2, "seconds_per_grid"_a = 1.0f,
           "tokens_per_second"_a = 0.0f, "text_after"_a = "max", "all_logits"_a = false,
           "Append one image/video run [n, n_embd] of patch grid (t, h, w): M-RoPE models place it at 3-D "
           "positions, others like eval_embd.")
        .def_prop_ro("next_position", [](x2l::LlmSession& s) {
            int32_t p = 0;
            x2l_bind::call_locked(s, [&] { p = s.next_position(); });
            return p;
        })
        .def("logits", [](x2l::LlmSession& s) {
            std::vector<float> v;
            x2l_bind::call_locked(s, [&] { v = s.last_logits(); });
            const size_t n = v.size();
            return x2l_bind::to_numpy(std::move(v), 0, n);
        }, "Logits of the last evaluated token, [n_vocab] float32.")
        .def("sample", [](x2l::LlmSession& s, x2l::Sampler& sampler) {
            int32_t tok = 0;
            x2l_bind::call_locked(s, [&] { tok = s.sample(sampler); });
            return tok;
        }, "sampler"_a)
        .def("truncate", [](x2l::LlmSession& s, int64_t n) { x2l_bind::call_locked(s, [&] { s.truncate(n); }); }, "n"_a)
        .def_prop_ro("history", [](x2l::LlmSession& s) {
            std::vector<int32_t> h;
            x2l_bind::call_locked(s, [&] { h = s.history(); });
            return h;
        })
        .def_prop_ro("n_past", [](x2l::LlmSession& s) {
            int64_t n = 0;
            x2l_bind::call_locked(s, [&] { n = s.n_past(); });
            return n;
        })
        .def("cancel", &x2l::LlmSession::cancel,
             "Stop the running call on this session from any thread (it raises CancelledError); later calls "
             "raise it too until clear_cancel().")
        .def("clear_cancel", &x2l::LlmSession::clear_cancel)
        .def_prop_ro("cancel_requested", [](x2l::LlmSession& s) { return s.interrupt().requested(); })
        .def_prop_ro("n_ctx", &x2l::LlmSession::n_ctx)
        .def_prop_ro("n_threads", &x2l::LlmSession::n_threads)
        .def_prop_ro("tokenizer", [](x2l::LlmSession& s) -> const x2l::Tokenizer& { return s.tokenizer(); },
                     nb::rv_policy::reference_internal)
        .def("metadata", [](const x2l::LlmSession& s, const std::string& key) -> nb::object {
            const x2l::GGUFValue* v = s.file().find(key);
            if (!v) return nb::none();
            if (v->type == x2l::GGUFType::STRING) return nb::str(v->str.c_str(), v->str.size());
            if (v->is_int()) return nb::int_(v->i);
            if (v->is_float()) return nb::float_(v->f);
            return nb::none();
        }, "key"_a)
        .def("info", [](const x2l::LlmSession& s) {
            const x2l::LlmConfig& c = s.model().config();
            nb::dict d;
            d["path"] = s.file().path();
            d["arch"] = c.arch;
            d["n_vocab"] = c.n_vocab;
            d["n_ctx_train"] = c.n_ctx_train;
            d["n_embd"] = c.n_embd;
            d["n_layer"] = c.n_layer;
            d["n_head"] = c.n_head;
            d["n_head_kv"] = c.n_head_kv;
            d["head_dim"] = c.head_dim;
            d["n_ff"] = c.n_ff;
            d["rope_base"] = c.rope_base;
            d["tied_output"] = c.tied_output;
            d["n_pos_axes"] = c.n_pos_axes;
            d["n_ctx"] = s.n_ctx();
            d["n_threads"] = s.n_threads();
            d["kv_type"] = std::string(x2l::type_info(s.options().kv_type).name);
            d["backend"] = s.executor().backend();
            d["device"] = s.device_name();
            d["cpu_features"] = x2l::cpu_features();
            return d;
        })
        .def("graph_stats", [](const x2l::LlmSession& s) { return x2l_bind::graph_stats_dict(s.graph_stats()); },
             "CUDA graph use of the device decode: captures, replays, note (why graphs were turned off).")
        .def("memory", [](x2l::LlmSession& s) {
            size_t kv = 0, ws = 0, dev = 0;
            x2l_bind::call_locked(s, [&] {
                kv = s.kv_bytes();
                ws = s.workspace_bytes();
                dev = s.device_bytes();
            });
            nb::dict d;
            d["weights_bytes"] = s.model().weight_bytes();
            d["kv_bytes"] = kv;
            d["workspace_bytes"] = ws;
            d["file_bytes"] = s.file().file_size();
            d["device_bytes"] = dev;  // weights + KV + work buffers on the GPU
            return d;
        });
}
