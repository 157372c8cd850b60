// Bindings for the X²L path: bi-level prefill, the video index (tiered KV store), chunk scoring and
// selection, and the decoder that reloads L-KVs asynchronously and answers on the mixed cache.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <optional>

#include "core/common.h"
#include "numpy_util.h"
#include "session_lock.h"
#include "x2l/x2l.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

x2l::DType tier_type(const std::string& s) {
    if (s == "f32") return x2l::DType::F32;
    if (s == "f16") return x2l::DType::F16;
    if (s == "q8_0") return x2l::DType::Q8_0;
    if (s == "q4_0") return x2l::DType::Q4_0;
    throw x2l::Error("KV tier type must be f32, f16, q8_0 or q4_0 (got '" + s + "')");
}

std::string segment_rows(const x2l::KVSegment& s, int layer, int head, bool value) {
    if (layer < 0 || layer >= s.n_layer() || head < 0 || head >= s.n_head_kv()) throw x2l::Error("layer/head out of range");
    const uint8_t* p = value ? s.v_row(layer, head, 0) : s.k_row(layer, head, 0);
    return std::string(reinterpret_cast<const char*>(p), s.row_bytes() * static_cast<size_t>(s.size()));
}

const x2l::ChunkKV& chunk_at(const x2l::VideoIndex& ix, int c) {
    if (c < 0 || c >= static_cast<int>(ix.chunks.size())) throw x2l::Error("chunk index out of range");
    return ix.chunks[c];
}


}  // namespace

void bind_x2l(nb::module_& m) {
    nb::class_<x2l::VideoIndex>(m, "VideoIndex")
        .def_prop_ro("n_chunks", [](const x2l::VideoIndex& ix) { return ix.chunks.size(); })
        .def_prop_ro("next_pos", [](const x2l::VideoIndex& ix) { return ix.next_pos; })
        .def_prop_ro("sink_tokens", [](const x2l::VideoIndex& ix) { return ix.sink_tokens; })
        .def("memory", [](const x2l::VideoIndex& ix) {
            x2l::TierBytes b = ix.bytes();
            nb::dict d;
            d["sink_bytes"] = b.sink;
            d["low_bytes"] = b.low;
            d["high_bytes"] = b.high;
            d["signature_bytes"] = b.signatures;
            return d;
        })
        .def("settings", [](const x2l::VideoIndex& ix) {
            nb::dict d;
            d["ratio_low"] = ix.ratio_low;
            d["ratio_high"] = ix.ratio_high;
            d["pin_ends"] = ix.pin_ends;
            d["two_pass"] = ix.two_pass;
            d["compressor"] = ix.compressor;
            d["dense_positions"] = ix.dense_positions;
            d["model_fingerprint"] = ix.model_fingerprint;
            d["text_pos"] = ix.text_pos;
            return d;
        })
        .def("chunk_info", [](const x2l::VideoIndex& ix, int c) {
            const x2l::ChunkKV& ch = chunk_at(ix, c);
            nb::dict d;
            d["tok_begin"] = ch.tok_begin;
            d["tok_end"] = ch.tok_end;
            d["pos_begin"] = ch.pos_begin;
            d["pos_end"] = ch.pos_end;
            d["n_frames"] = ch.n_frames;
            d["low_entries"] = ch.low->size();
            d["high_entries"] = ch.high->size();
            d["low_bytes"] = ch.low->used_bytes();
            d["high_bytes"] = ch.high->used_bytes();
            d["low_type"] = std::string(x2l::type_info(ch.low->type()).name);
            d["high_type"] = std::string(x2l::type_info(ch.high->type()).name);
            d["low_mapped"] = ix.file_mapped();
            d["signature_rows"] = ch.row_sig.size() / static_cast<size_t>(ix.n_embd);  // the maxsim scorer's rows
            return d;
        }, "chunk"_a)
        .def("low_rows", [](const x2l::VideoIndex& ix, int c, int layer, int head, bool value) {
            const x2l::ChunkKV& ch = chunk_at(ix, c);
            ix.check_low(static_cast<size_t>(c));
            const std::string r = segment_rows(*ch.low, layer, head, value);
            return nb::bytes(r.data(), r.size());
        }, "chunk"_a, "layer"_a, "head"_a, "value"_a = false)
        .def("high_rows", [](const x2l::VideoIndex& ix, int c, int layer, int head, bool value) {
            const std::string r = segment_rows(*chunk_at(ix, c).high, layer, head, value);
            return nb::bytes(r.data(), r.size());
        }, "chunk"_a, "layer"_a, "head"_a, "value"_a = false)
        .def("low_positions", [](const x2l::VideoIndex& ix, int c) {
            // Positions of the L entries per layer and KV head (SnapKV keeps different tokens per
            // head): flat [n_layer, n_head_kv, low_entries].
            const x2l::ChunkKV& ch = chunk_at(ix, c);
            const int L = ch.low->n_layer(), H = ch.low->n_head_kv();
            std::vector<int32_t> out;
            out.reserve(static_cast<size_t>(L) * H * ch.low->size());
            for (int l = 0; l < L; ++l) {
                for (int h = 0; h < H; ++h) {
                    for (int64_t e = 0; e < ch.low->size(); ++e) out.push_back(ch.low_row_pos(l, h, e));
                }
            }
            return out;
        }, "chunk"_a)
        .def("save", [](const x2l::VideoIndex& ix, const std::string& path) {
            nb::gil_scoped_release nogil;
            ix.save(path);
        }, "path"_a)
        .def_static("load", [](const std::string& path, bool mmap) {
            nb::gil_scoped_release nogil;
            return x2l::VideoIndex::load(path, mmap);
        }, "path"_a, "mmap"_a = false,
           "Load a saved index: read into memory (mmap=False), or with the L rows in a read-only file mapping.")
        .def_static("from_bytes", [](nb::bytes data, bool verify_checksums) {
            return x2l::VideoIndex::from_bytes(reinterpret_cast<const uint8_t*>(data.c_str()), data.size(),
                                               verify_checksums);
        }, "data"_a, "verify_checksums"_a = true, "Parse an index image (tests and fuzzers).");

    nb::class_<x2l::X2LPrefill>(m, "X2LPrefill")
        .def("__init__", [](x2l::X2LPrefill* self, x2l::LlmSession& s, int ratio_low, int ratio_high,
                            const std::string& low_type, const std::string& high_type, bool pin_ends, bool two_pass,
                            int obs_window, int pool_kernel, size_t max_host_bytes, size_t max_device_bytes,
                            const std::string& compressor, int64_t prefill_low_cache_bytes,
                            const std::vector<int32_t>& repeat_prompt, bool max_votes,
                            const std::string& pool_scope, bool merge, float merge_min_similarity,
                            bool dense_positions, const std::string& high_compressor) {
            x2l::X2LOptions o;
            o.ratio_low = ratio_low;
            o.ratio_high = ratio_high;
            o.low_type = tier_type(low_type);
            o.high_type = tier_type(high_type);
            o.pin_ends = pin_ends;
            o.two_pass = two_pass;
            o.obs_window = obs_window;
            o.pool_kernel = pool_kernel;
            o.max_host_bytes = max_host_bytes;
            o.max_device_bytes = max_device_bytes;
            o.compressor = compressor;
            o.prefill_low_cache_bytes = prefill_low_cache_bytes;
            o.repeat_prompt = repeat_prompt;
            o.max_votes = max_votes;
            o.pool_scope = pool_scope;
            o.merge = merge;
            o.merge_min_similarity = merge_min_similarity;
            o.dense_positions = dense_positions;
            o.high_compressor = high_compressor;
            x2l_bind::call_locked(s, [&] { new (self) x2l::X2LPrefill(s, o); });
        }, "session"_a, nb::kw_only(), "ratio_low"_a, "ratio_high"_a, "low_type"_a, "high_type"_a, "pin_ends"_a,
           "two_pass"_a, "obs_window"_a, "pool_kernel"_a, "max_host_bytes"_a, "max_device_bytes"_a, "compressor"_a,
           "prefill_low_cache_bytes"_a, "repeat_prompt"_a, "max_votes"_a, "pool_scope"_a, "merge"_a,
           "merge_min_similarity"_a, "dense_positions"_a, "high_compressor"_a,
           nb::keep_alive<1, 2>(),
           "Every option is required: their defaults live in x2l_edge.X2LOptions.")
        .def("add_sink", [](x2l::X2LPrefill& p, const std::vector<int32_t>& tokens) {
            x2l_bind::call_locked(p.session(), [&] { p.add_sink(tokens); });
        }, "tokens"_a)
        .def("add_chunk_tokens", [](x2l::X2LPrefill& p, const std::vector<int32_t>& tokens, int n_frames, bool is_last) {
            x2l_bind::call_locked(p.session(), [&] { p.add_chunk_tokens(tokens, n_frames, is_last); });
        }, "tokens"_a, "n_frames"_a = 1, "is_last"_a = false)
        .def("add_chunk_embd", [](x2l::X2LPrefill& p, nb::ndarray<const float, nb::ndim<2>, nb::c_contig> embd,
                                  int n_frames, bool is_last,
                                  std::optional<nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig>> pos) {
            const int64_t n = static_cast<int64_t>(embd.shape(0));
            if (pos && (pos->shape(0) != 3 || static_cast<int64_t>(pos->shape(1)) != n)) {
                throw x2l::Error("pos must be int32 [3, n] (M-RoPE rows t, h, w of the chunk's rows)");
            }
            const int32_t* pos_rows = pos ? pos->data() : nullptr;
            x2l_bind::call_locked(p.session(), [&] { p.add_chunk_embd(embd.data(), n, n_frames, is_last, pos_rows); });
        }, "embd"_a, "n_frames"_a = 1, "is_last"_a = false, "pos"_a = nb::none())
        .def("set_text_position", [](x2l::X2LPrefill& p, int32_t pos) {
            x2l_bind::call_locked(p.session(), [&] { p.set_text_position(pos); });
        }, "pos"_a,
             "M-RoPE media: the position the question's text takes after the input.")
        .def("finish", [](x2l::X2LPrefill& p) {
            std::unique_ptr<x2l::VideoIndex> ix;
            x2l_bind::call_locked(p.session(), [&] { ix = p.finish(); });
            return ix;
        })
        .def("snapshot", [](const x2l::X2LPrefill& p) {
            std::unique_ptr<x2l::VideoIndex> ix;
            x2l_bind::call_locked(p.session(), [&] { ix = p.snapshot(); });
            return ix;
        }, "The chunks added so far as an index (rows shared with the prefill), while it goes on.")
        .def("stats", [](const x2l::X2LPrefill& p) {
            nb::dict d;
            d["input_tokens"] = p.stats().input_tokens;
            d["forward_tokens"] = p.stats().forward_tokens;
            d["device_forward_tokens"] = p.stats().device_forward_tokens;
            d["seconds"] = p.stats().seconds;
            d["device_peak_bytes"] = p.stats().device_peak_bytes;
            d["streamed_bytes"] = p.stats().streamed_bytes;
            d["fetched_bytes"] = p.stats().fetched_bytes;
            d["cached_low_bytes"] = p.stats().cached_low_bytes;
            d["working_bytes"] = p.working_bytes();
            d["on_device"] = p.on_device();
            d["device_note"] = p.device_note();
            return d;
        });

    m.def("select_chunks", [](const x2l::VideoIndex& ix, const std::vector<float>& scores, int top_k,
                              size_t budget_bytes, bool include_first, bool include_last, const std::string& rule,
                              int max_k, double mass_p) {
        x2l::SelectOptions o;
        o.top_k = top_k;
        o.budget_bytes = budget_bytes;
        o.include_first = include_first;
        o.include_last = include_last;
        o.rule = x2l::select_rule_from_name(rule);
        o.max_k = max_k;
        o.mass_p = mass_p;
        return x2l::select_chunks(ix, scores, o);
    }, "index"_a, "scores"_a, "top_k"_a = 3, "budget_bytes"_a = 0, "include_first"_a = false,
       "include_last"_a = false, "rule"_a = "top_k", "max_k"_a = 6, "mass_p"_a = 0.9);

    m.def("peak_significance", [](nb::ndarray<const double, nb::ndim<2>, nb::c_contig> mass, int64_t n_content) {
        return x2l::peak_significance(mass.data(), static_cast<int64_t>(mass.shape(0)), n_content, mass.shape(1));
    }, "mass"_a, "n_content"_a,
          "The attention/keys scorers' chunk score from per-token masses [n_tokens, n_chunks] (float64).");

    nb::class_<x2l::X2LDecoder>(m, "X2LDecoder")
        .def("__init__", [](x2l::X2LDecoder* self, x2l::LlmSession& s, const x2l::VideoIndex& ix, int64_t max_tail,
                            int32_t question_gap) {
            x2l_bind::call_locked(s, [&] { new (self) x2l::X2LDecoder(s, ix, max_tail, question_gap); });
        }, "session"_a, "index"_a, "max_tail_tokens"_a = 1024, "question_gap"_a = 0, nb::keep_alive<1, 2>(),
           nb::keep_alive<1, 3>())
        .def("scores", [](x2l::X2LDecoder& d, const std::vector<int32_t>& q, const std::string& scorer,
                          int64_t content_begin, int64_t content_end) {
            x2l::Scorer sc = x2l::scorer_from_name(scorer);
            std::vector<float> out;
            x2l_bind::call_locked(d.session(), [&] { out = d.scores(q, sc, content_begin, content_end); });
            return out;
        }, "question"_a, "scorer"_a = "keys", "content_begin"_a = 0, "content_end"_a = 0)
        .def("score_stats", [](x2l::X2LDecoder& d) {
            x2l::ScoreStats st;
            x2l_bind::call_locked(d.session(), [&] { st = d.score_stats(); });
            nb::dict r;
            r["low_bytes"] = st.reads.low_bytes;
            r["high_bytes"] = st.reads.high_bytes;
            r["signature_bytes"] = st.reads.signature_bytes;
            r["pass_seconds"] = st.pass_seconds;
            r["scan_seconds"] = st.scan_seconds;
            return r;
        }, "The last scores() call: index bytes its chunk scan read per tier, and its time (question pass, scan).")
        .def("prepare", [](x2l::X2LDecoder& d, const std::vector<int>& sel) {
            x2l_bind::call_locked(d.session(), [&] { d.prepare(sel); });
        }, "selected"_a)
        .def_prop_ro("selected", [](x2l::X2LDecoder& d) {
            std::vector<int> sel;
            x2l_bind::call_locked(d.session(), [&] { sel = d.selected(); });
            return sel;
        })
        .def("wait_reload", [](x2l::X2LDecoder& d) {
            x2l_bind::call_locked(d.session(), [&] { d.wait_reload(); });
        }, "Block until the last prepare()'s L-KV copies have landed (to time a reload without overlap).")
        .def("eval", [](x2l::X2LDecoder& d, const std::vector<int32_t>& tokens, bool all_logits) -> nb::object {
            std::vector<float> all;
            x2l_bind::call_locked(d.session(), [&] { d.eval(tokens, all_logits ? &all : nullptr); });
            if (!all_logits) return nb::none();
            size_t nv = d.last_logits().size();
            return nb::cast(x2l_bind::to_numpy(std::move(all), tokens.size(), nv));
        }, "tokens"_a, "all_logits"_a = false)
        .def("logits", [](x2l::X2LDecoder& d) {
            std::vector<float> v;
            x2l_bind::call_locked(d.session(), [&] { v = d.last_logits(); });
            size_t n = v.size();
            return x2l_bind::to_numpy(std::move(v), 0, n);
        })
        .def("sample", [](x2l::X2LDecoder& d, x2l::Sampler& sampler) {
            int32_t tok = 0;
            x2l_bind::call_locked(d.session(), [&] { tok = d.sample(sampler); });
            return tok;
        }, "sampler"_a)
        .def("truncate", [](x2l::X2LDecoder& d, int64_t n) { x2l_bind::call_locked(d.session(), [&] { d.truncate(n); }); },
             "n"_a)
        .def_prop_ro("history", [](x2l::X2LDecoder& d) {
            std::vector<int32_t> h;
            x2l_bind::call_locked(d.session(), [&] { h = d.history(); });
            return h;
        })
        .def_prop_ro("n_past", [](x2l::X2LDecoder& d) {
            int64_t n = 0;
            x2l_bind::call_locked(d.session(), [&] { n = d.n_past(); });
            return n;
        })
        .def_prop_ro("n_ctx", &x2l::X2LDecoder::n_ctx)
        .def_prop_ro("cache_entries", &x2l::X2LDecoder::cache_entries)
        .def_prop_ro("question_position", &x2l::X2LDecoder::question_position)
        .def_prop_ro("on_device", &x2l::X2LDecoder::on_device)
        .def_prop_ro("device_note", &x2l::X2LDecoder::device_note)
        .def("prefix_rows", [](x2l::X2LDecoder& d, size_t i, int layer, int head, bool value) {
            std::string rows;
            x2l_bind::call_locked(d.session(), [&] {
                d.wait_reload();
                if (i >= d.prefix_segments().size()) throw x2l::Error("segment index out of range");
                rows = segment_rows(*d.prefix_segments()[i], layer, head, value);
            });
            return nb::bytes(rows.data(), rows.size());
        }, "segment"_a, "layer"_a, "head"_a, "value"_a = false,
           "Rows of the i-th segment of the mixed cache (0 = sink, 1 + c = chunk c), after the reload completed.")
        .def("resident_bytes", &x2l::X2LDecoder::resident_bytes)
        .def("working_bytes", &x2l::X2LDecoder::working_bytes)
        .def("graph_stats", [](const x2l::X2LDecoder& d) { return x2l_bind::graph_stats_dict(d.graph_stats()); })
        .def("reload_stats", [](const x2l::X2LDecoder& d) {
            const x2l::ReloadStats& s = d.reload_stats();
            nb::dict r;
            r["bytes"] = s.bytes;
            r["copy_seconds"] = s.copy_seconds;
            r["wait_seconds"] = s.wait_seconds;
            r["n_chunks"] = s.n_chunks;
            return r;
        });
}
