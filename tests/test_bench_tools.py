"""Benchmark tools: needle generators (deterministic, needles in the stated chunk), the synthetic video-needle
generator (readable files, needle frames where stated), and the runner's JSON schema on a tiny model.
Fast checks only; the heavy runs live in bench/."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import x2l_edge

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import eval_compressors as C  # noqa: E402
import eval_needles as E  # noqa: E402
import video_needles as V  # noqa: E402


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return x2l_edge.Session(smollm2_path, n_threads=2, n_ctx=1024)


@pytest.fixture(scope="module")
def tiny_llama(tiny_gguf):
    return tiny_gguf("llama", "f32")


@pytest.mark.parametrize("task", E.TASKS)
def test_needle_generators_are_deterministic(smol, task):
    tok = E.Tok(smol)
    a = E.make_sample(task, 3, tok, n_tokens=512, chunk_tokens=128)
    b = E.make_sample(task, 3, tok, n_tokens=512, chunk_tokens=128)
    c = E.make_sample(task, 4, tok, n_tokens=512, chunk_tokens=128)
    assert a == b
    assert a["context"] != c["context"]
    assert a["n_tokens"] >= (400 if task == "cwe" else 500)  # cwe sizes its list from an estimate
    for ans in a["answers"]:
        assert ans in a["context"]
    # the checker accepts the expected answer and rejects a wrong one
    good = ", ".join(a["answers"]) if task != "cwe" else f'"{a["answers"][0]}"'
    assert E.is_correct(a, good)[0]
    assert not E.is_correct(a, "42")[0]
    if task == "cwe":
        assert a["target_count"] > a["other_max_count"]


@pytest.mark.parametrize("task", ["single", "multikey", "multivalue"])
def test_needles_land_in_the_stated_chunk(smol, task):
    """The needle's tokens lie inside chunk_info(c)'s token range of the index that prefill_text builds."""
    tok = E.Tok(smol)
    ct = 128
    smp = E.make_sample(task, 1, tok, n_tokens=3 * ct, chunk_tokens=ct)
    ctx = smol.prefill_text(smp["context"], chunk_tokens=ct, ratio_low=2, ratio_high=16)
    sink = len(ctx.index.sink_tokens)
    ids = tok.ids(smp["context"])
    assert ctx.n_chunks == -(-len(ids) // ct)
    for (t0, t1), chunks, text in zip(smp["needle_token_spans"], smp["needle_chunks_all"], smp["needle_texts"]):
        assert len(chunks) == 1, "a needle crosses a chunk boundary"
        info = ctx.chunk_info(chunks[0])
        assert info["tok_begin"] <= sink + t0 and sink + t1 <= info["tok_end"]
        # and those tokens really are the needle
        assert smol.detokenize(ids[t0:t1]).strip() == text
    assert set(smp["needle_chunks"]) <= {c for cs in smp["needle_chunks_all"] for c in cs}


def test_video_needles_are_readable_and_where_stated(tmp_path):
    from x2l_edge.video import open_video

    path = V.generate(str(tmp_path), items=1, n_chunks=3, chunk_frames=3, needle_frames=2, size=64, fps=2)
    spec = json.loads(Path(path).read_text())
    assert len(spec["items"]) == len(V.TASKS)
    for it in spec["items"]:
        frames = np.stack([f.rgb for f in open_video(str(tmp_path / it["video"]))])
        assert frames.shape == (9, 64, 64, 3)
        _, ref = V.make_item(it["task"], it["idx"], n_chunks=3, chunk_frames=3, needle_frames=2, size=64)
        np.testing.assert_array_equal(frames, ref)  # FFV1: lossless, and the generator is deterministic
        # the white card (255) is on exactly the needle frames; haystack frames stay <= 225
        card = [(f[24:40, 8:56] == 255).all(axis=-1).mean() > 0.2 for f in frames]
        assert [i for i, c in enumerate(card) if c] == it["needle_frames"]
        assert it["needle_chunks"] == sorted({f // 3 for f in it["needle_frames"]})
        assert sorted(n["chunk"] for n in it["needles"]) == sorted(
            c for n in it["needles"] for c in {f // 3 for f in n["frames"]})
        # 4 rotations, the correct option moves with them
        rots = it["rotations"]
        assert len(rots) == 4 and len({r["answer"] for r in rots}) == 4
        for r in rots:
            assert r["options"]["ABCD".index(r["answer"])] == it["answer"]
    meta, _ = V.make_item("counting", 0, n_chunks=6, chunk_frames=2, needle_frames=1, size=32)
    assert meta["count"] == len(meta["needle_chunks"])
    assert V.parse_letter(" (B) TELESCOPE", ["a", "b", "c", "d"]) == "B"
    assert V.parse_letter("it is a red star", ["a blue moon", "a red star", "x", "y"]) == "B"


def test_runner_json_schema_on_a_tiny_model(tiny_llama, tmp_path):
    import run

    out = tmp_path / "r"
    rc = run.main(["--model", tiny_llama, "--lengths", "48", "96", "--systems", "x2l_full", "x2l", "llama_cpp",
                   "--decode", "4", "--chunk-tokens", "32", "--top-k", "1", "--ratio-high", "8", "--out", str(out),
                   "--timeout", "120"])
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    for k in ("bench", "command", "model", "threads", "lengths", "systems", "cpu", "x2l", "results"):
        assert k in res
    assert res["lengths"] == [48, 96]
    rows = {(r["system"], r["length"]): r for r in res["results"]}
    assert set(rows) == {(s, n) for s in ("x2l_full", "x2l", "llama_cpp") for n in (48, 96)}
    for (system, n), r in rows.items():
        if r.get("skipped"):
            assert system == "llama_cpp"  # only when llama-cpp-python is missing
            continue
        assert "error" not in r, r.get("error")
        for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "question_ttft_s", "peak_rss_bytes", "kv",
                  "prompt_tokens", "answer"):
            assert k in r, (system, k)
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["context_tokens"] >= n
    x = rows[("x2l", 96)]
    for k in ("sink_bytes", "high_bytes", "low_bytes", "resident_bytes", "used_bytes", "decode_cache_entries"):
        assert k in x["kv"]
    assert set(x["reload"]) >= {"bytes", "copy_seconds"}
    assert x["n_chunks"] >= 3 and len(x["selected"]) == 1
    assert x["kv"]["decode_cache_entries"] < rows[("x2l_full", 96)]["kv"]["decode_cache_entries"]
    md = out.with_suffix(".md").read_text()
    assert "Decode tokens/s" in md and "X²L tiers" in md


def test_needle_eval_writes_partial_results_and_resumes(tiny_llama, tmp_path):
    out = str(tmp_path / "nd")
    args = ["--model", tiny_llama, "--tasks", "single", "cwe", "--samples", "1", "--tokens", "384", "--chunk-tokens",
            "128", "--ratio-high", "8", "--ks", "1", "--scorers", "keys", "embedding", "--out", out]
    assert E.main(args) == 0
    res = json.loads(Path(out + ".json").read_text())
    assert res["samples_done"] == 2
    cells = res["summary"]["single"]["modes"]
    assert set(cells) == {"full", "l_only", "h_only", "oracle", "keys@1", "embedding@1"}
    for c in cells.values():
        assert {"acc", "chunk_recall", "cache_bytes", "seconds", "n"} <= set(c)
    assert cells["l_only"]["chunk_recall"] == 1.0 and cells["h_only"]["chunk_recall"] == 0.0
    lines = Path(out + ".jsonl").read_text().splitlines()
    assert len(lines) == 2
    # a second run with the same settings resumes: nothing new is computed
    assert E.main(args + ["--samples", "2", "--tasks", "single"]) == 0
    assert len(Path(out + ".jsonl").read_text().splitlines()) == 3
    assert "single" in Path(out + ".md").read_text()


def test_test_split_is_held_out(smol):
    """split='test' shares no filler sentence, needle wording or key with split='tune' for the same index."""
    tok = E.Tok(smol)
    for task in ("single", "multikey", "multivalue"):
        tune = E.make_sample(task, 0, tok, n_tokens=512, chunk_tokens=128)
        test = E.make_sample(task, 0, tok, n_tokens=512, chunk_tokens=128, split="test")
        assert "secret PIN" in test["needle_texts"][0] and "magic number" in tune["needle_texts"][0]
        tune_sents = {x.strip() for x in tune["context"].split(".")}
        test_sents = {x.strip() for x in test["context"].split(".")}
        assert not (tune_sents & test_sents) - {""}
        for ans in test["answers"]:
            assert ans in test["context"]


def test_compressor_eval_runs_shards_and_resumes(tiny_llama, tmp_path):
    out = str(tmp_path / "cmp")
    args = ["--model", tiny_llama, "--tasks", "single", "--samples", "2", "--tokens", "576", "--chunk-tokens",
            "192", "--ratio-high", "8", "--configs", "snapkv", "keydiff", "rl1_snapkv", "--out", out]
    assert C.main(args + ["--shard", "0/2"]) == 0
    assert C.main(args + ["--shard", "1/2"]) == 0
    res = json.loads(Path(out + ".json").read_text())
    assert res["samples_done"] == 2 and res["split"] == "test" and res["isa"]
    cells = res["summary"]["single"]["configs"]
    assert set(cells) == {"snapkv", "keydiff", "rl1_snapkv"}
    for name, c in cells.items():
        assert c["n"] == 2 and {"top3", "oracle", "h_only", "top3_chunk_recall", "low_bytes"} <= set(c)
    # the L tier at ratio_low 2 holds half the entries of ratio_low 1 (same KV type)
    assert abs(cells["snapkv"]["low_bytes"] * 2 - cells["rl1_snapkv"]["low_bytes"]) <= 0.02 * cells["rl1_snapkv"]["low_bytes"]
    # a rerun resumes from both shards' records: nothing new is computed
    assert C.main(args) == 0
    n_lines = sum(len(Path(p).read_text().splitlines()) for p in (out + ".shard0.jsonl", out + ".shard1.jsonl"))
    assert n_lines == 2 and not Path(out + ".jsonl").exists()
    assert "rl1_snapkv" in Path(out + ".md").read_text()
    # one more configuration: only it runs, the full-KV answers and the other configurations are reused
    before = {r["idx"]: r for p in (out + ".shard0.jsonl", out + ".shard1.jsonl")
              for r in map(json.loads, Path(p).read_text().splitlines())}
    assert C.main(args + ["--configs", "snapkv", "keydiff", "rl1_snapkv", "hybrid"]) == 0
    after = [json.loads(x) for x in Path(out + ".jsonl").read_text().splitlines()]
    assert len(after) == 2
    for r in after:
        assert r["full"] == before[r["idx"]]["full"] and r["configs"]["snapkv"] == before[r["idx"]]["configs"]["snapkv"]
        assert set(r["configs"]) == {"snapkv", "keydiff", "rl1_snapkv", "hybrid"}
    res = json.loads(Path(out + ".json").read_text())
    assert res["summary"]["single"]["configs"]["hybrid"]["n"] == 2
    # --report: no run, the summary of the configurations asked for
    assert C.main(args + ["--report", "--configs", "snapkv"]) == 0
    assert len(Path(out + ".jsonl").read_text().splitlines()) == 2
    res = json.loads(Path(out + ".json").read_text())
    assert set(res["summary"]["single"]["configs"]) == {"snapkv"} and "report" in res["command"]
    # --gap on the same records: only the gap question runs; the earlier modes stay as they were
    before = {r["idx"]: r for r in map(json.loads, Path(out + ".jsonl").read_text().splitlines())}
    assert C.main(args + ["--configs", "keydiff", "--gap", "--max-k", "2"]) == 0
    recs = {}
    for line in Path(out + ".jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["idx"]] = r  # the last line of a sample is its newest record
    for i, r in recs.items():
        k, k0 = r["configs"]["keydiff"], before[i]["configs"]["keydiff"]
        assert {m: k[m] for m in ("top3", "oracle", "h_only")} == {m: k0[m] for m in ("top3", "oracle", "h_only")}
        assert 1 <= len(k["gap_chunks"]) <= 2 and k["gap_chunks"] == sorted(k["gap_chunks"])
        assert isinstance(k["gap"]["correct"], bool) and 0 <= k["gap_recall"] <= 1
        assert r["configs"]["snapkv"] == before[i]["configs"]["snapkv"]
    cell = json.loads(Path(out + ".json").read_text())["summary"]["single"]["configs"]["keydiff"]
    assert cell["gap_n"] == 2 and 1 <= cell["gap_chunks_mean"] <= 2
    assert "X²L gap" in Path(out + ".md").read_text()


def test_multivalue_summary_reports_the_share_of_values_recalled():
    """RULER scores multi-value needles by the mean share of the expected values found (string_match_all):
    aggregate() keeps that per mode next to the all-or-nothing count, on the same samples, and the report
    prints it for the multivalue task."""
    def rec(idx, full_frac, top3_frac):
        mode = lambda f: {"output": "", "correct": f == 1.0, "frac": f}  # noqa: E731
        return {"task": "multivalue", "idx": idx, "n_tokens": 1000, "full_kv_context_bytes": 100, "full": mode(full_frac),
                "configs": {"keydiff": {"ratio_low": 2, "ratio_high": 32, "top3": mode(top3_frac), "oracle": mode(1.0),
                                        "h_only": mode(0.0), "top3_recall": 1.0, "prefill_seconds": 1.0,
                                        "tiers": {"low_bytes": 50, "high_bytes": 3}}}}
    recs = [rec(0, 1.0, 2 / 3), rec(1, 1 / 3, 1 / 3), rec(2, 2 / 3, 1.0)]
    cell = C.aggregate(recs, ["keydiff"], ["multivalue"])["multivalue"]["configs"]["keydiff"]
    assert cell["full"] == 1 and cell["top3"] == 1  # all values named: sample 0 in full, sample 2 in top-3
    assert cell["full_answer_recall"] == pytest.approx(2 / 3) and cell["top3_answer_recall"] == pytest.approx(2 / 3)
    meta = dict(model="m", split="test", command="c", seed=0, tokens=1000, chunk_tokens=256, ratio_low=2, ratio_high=32,
                scorer="attention", threads=1, time="t", load_start=None, cpu="cpu", isa="AVX2")
    md = C.markdown(C.aggregate(recs, ["keydiff"], ["multivalue"]), meta)
    assert "string_match_all" in md and "| keydiff | 0.667 | 0.667 | 1.000 | 0.000 | 100% |" in md


def test_tiny_vlm_eval_takes_any_prefill_option():
    import eval_tiny_vlm as TV

    assert TV.parse_options(["merge_min_similarity=0.9", "pool_scope=all", "two_pass=False"]) == {
        "merge_min_similarity": 0.9, "pool_scope": "all", "two_pass": False}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        TV.parse_options(["no_such_option=1"])
    with pytest.raises(ValueError, match="merge_min_similarity"):
        TV.parse_options(["merge_min_similarity=2"])


def test_settings_that_differ_only_at_question_time_share_one_prefill(tiny_llama):
    """bench_common.SharedPrefill: a setting that changes only question-time options (question_gap) reuses
    the earlier index with its own question defaults; any prefill option makes a new prefill."""
    import x2l_edge
    from bench_common import SharedPrefill
    from x2l_edge.options import X2LOptions

    s = x2l_edge.Session(tiny_llama, n_threads=1)
    text = " ".join(f"word{i}" for i in range(300))
    shared, made = SharedPrefill(), []

    def ctx_for(**kw):
        def prefill():
            made.append(kw)
            return s.prefill_text(text, chunk_tokens=96, **kw)
        return shared.context(kw, prefill, X2LOptions.for_model(s, video=False, **kw))

    a, base_a = ctx_for(dense_positions=True, question_gap=0)
    b, base_b = ctx_for(dense_positions=True, question_gap=100)
    c, _ = ctx_for(dense_positions=True, ratio_high=8, question_gap=100)
    assert len(made) == 2 and base_a is a and base_b is a and b.index is a.index and c.index is not a.index
    assert a._dec.question_position == a._dec.cache_entries  # dense: the question follows the last entry
    assert b._dec.question_position == a._dec.cache_entries + 100
    assert c._dec.question_position == c._dec.cache_entries + 100
    assert (b.question_prefix, b.question_suffix) == (a.question_prefix, a.question_suffix)


def test_tiny_vlm_sweep_report(tmp_path):
    """bench/tiny_vlm_sweep.py: per-setting counts from the items, Wilson intervals, the options in the table."""
    import tiny_vlm_sweep as S

    def item(i, full, **cfg):
        return {"i": i, "word": "w", "needle_chunk": 1, "full": {"answer": "", "correct": full},
                "configs": {n: {"chunks": [1], "selected": True, **{m: {"answer": "", "correct": c[j]}
                                                                    for j, m in enumerate(S.MODES)}}
                            for n, c in cfg.items()}}
    res = {"seed": 555, "length": 240, "threads": 1, "machine": "m", "time": "t", "load_start": 1.0, "command": "c",
           "configs": {"a": {"pool_scope": "layers"}, "b": {"pool_scope": "all"}},
           "items": [item(0, True, a=(1, 1, 0), b=(0, 1, 0)), item(1, False, a=(1, 0, 0), b=(0, 0, 1))]}
    sm = S.summary(res)
    assert sm["full"] == 1 and sm["configs"]["a"] == {"x2l": 2, "oracle1": 1, "h_only": 0, "selected": 2}
    assert sm["configs"]["b"] == {"x2l": 0, "oracle1": 1, "h_only": 1, "selected": 2}
    out = str(tmp_path / "sweep")
    S.write(res, out)
    assert S.main(["--config", "x", "--report", "--out", out]) == 0
    md = Path(out + ".md").read_text()
    assert "| a | pool_scope=layers | 2/2 (34–100) | 1/2 (9–91) | 0/2 (0–66) | 2/2 |" in md


def test_kernel_resources_reads_ptxas_output():
    """bench/gpu/kernel_resources.py: entries, spills, registers and shared memory from a ptxas -v log
    (the format nvcc 12/13 print), and short kernel names from demangled ones."""
    sys.path.insert(0, str(BENCH / "gpu"))
    import kernel_resources as K

    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN3x2l5cudak12_GLOBAL__N_19attn_kernelILi4EEEvNS1_8AttnArgsE' for 'sm_87'
ptxas info    : Function properties for _ZN3x2l5cudak12_GLOBAL__N_19attn_kernelILi4EEEvNS1_8AttnArgsE
    8 bytes stack frame, 4 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 504 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN3x2l5cudak7rms_normEv' for 'sm_87'
ptxas info    : Function properties for _ZN3x2l5cudak7rms_normEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 16 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
"""
    r = K.parse(log)
    assert list(r) == ["_ZN3x2l5cudak12_GLOBAL__N_19attn_kernelILi4EEEvNS1_8AttnArgsE", "_ZN3x2l5cudak7rms_normEv"]
    a, b = r.values()
    assert a == {"stack": 8, "spill_stores": 4, "spill_loads": 20, "registers": 64, "smem_static": 0}
    assert b == {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 16, "smem_static": 128}
    pretty = "void x2l::cudak::(anonymous namespace)::get_rows_kernel<x2l::cudak::Fmt<14> >(unsigned char const*, long)"
    assert K.short_name(pretty) == "get_rows_kernel<Fmt<q6_k> >"
    assert K.short_name("x2l::cudak::(anonymous namespace)::attn_tc_kernel(x2l::cudak::AttnArgs)") == "attn_tc_kernel"
