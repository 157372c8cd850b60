"""Saved indexes and GGUF files are untrusted input (issue 24): every field validated, checksums and a
model fingerprint verified, no crash or hang whatever the file holds or becomes after loading."""
from __future__ import annotations

import math
import os
import random
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import index_format as fmt
import x2l_edge
from x2l_edge import _core
from x2l_edge.x2l import VideoContext, prefill_chunks, split_template

CHUNK = 24


def _tiny_gguf(d, seed):
    import convert
    import tiny_models

    hf = tiny_models.make_tiny_qwen2(d / f"hf{seed}", seed=seed, hidden_size=128, intermediate_size=256)
    path = d / f"m{seed}.gguf"
    convert.convert(str(hf), str(path), "f32", progress=False)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny qwen2 GGUFs with the same dimensions and different weights."""
    d = tmp_path_factory.mktemp("untrusted")
    return _tiny_gguf(d, 5), _tiny_gguf(d, 6)


@pytest.fixture(scope="module")
def tiny(models):
    return x2l_edge.Session(models[0], n_threads=2, kv_type="f32", n_ctx=512)


def _context(session, n_chunks=4):
    text = ("the model reads a long video and answers questions about what happens in each scene "
            "while the cache keeps only the tokens that matter for the next frame. ") * 6
    ids = session.tokenize(text, special=False)[: n_chunks * CHUNK]
    prefix, suffix = split_template(session, "be brief")
    index, _ = prefill_chunks(session, [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)],
                              sink_ids=session.tokenize(prefix), ratio_low=2, ratio_high=6, frames_per_chunk=3)
    return VideoContext(session, index, question_suffix=suffix)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """(path, raw bytes, layout) of a saved 4-chunk index."""
    path = tmp_path_factory.mktemp("index") / "video.x2l"
    _context(tiny).save(path)
    raw = path.read_bytes()
    return path, raw, fmt.layout(raw)


def _load_bytes(tmp_path, data, name="m.x2l", **kw):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return _core.VideoIndex.load(str(p), **kw)


def _mutated(raw, lay, field, value):
    d = bytearray(raw)
    fmt.put(d, field, value)
    if lay["version"] >= 3:
        fmt.reseal(d, lay, field[0])
    return d


# ------------------------------------------------------------------------------------------ index fields

def test_n_frames_must_match_the_embedding_signature(saved, tmp_path):
    """Defect 1: one changed n_frames made the embedding scorer read past the signature (SIGSEGV or
    foreign memory). Checksums re-sealed, as a crafted file would have them: the loader itself refuses."""
    _, raw, lay = saved
    ch = lay["chunks"][1]
    n_frames = fmt.get(raw, ch["n_frames"])
    for bad in (n_frames + 1, 2**20, 0, -1):
        with pytest.raises(x2l_edge.FormatError, match="n_frames|frame"):
            _load_bytes(tmp_path, _mutated(raw, lay, ch["n_frames"], bad))


def _field_mutations(raw, lay):
    """(description, field, value) of single-field changes that must all be refused."""
    f, c0, c1 = lay["fields"], lay["chunks"][0], lay["chunks"][1]
    g = lambda fld: fmt.get(raw, fld)  # noqa: E731
    muts = [
        ("n_layer", f["n_layer"], g(f["n_layer"]) + 1),
        ("head_dim", f["head_dim"], 33),
        ("head_dim huge", f["head_dim"], 1 << 20),
        ("n_embd", f["n_embd"], -5),
        ("ratio_low", f["ratio_low"], 0),
        ("ratio_high < ratio_low", f["ratio_high"], 1),
        ("bool pin_ends", f["pin_ends"], 7),
        ("dense positions without beacon", f["dense_positions"], 1),
        ("next_pos", f["next_pos"], g(f["next_pos"]) + 5),
        ("next_pos negative", f["next_pos"], -1),
        ("n_chunks", f["n_chunks"], g(f["n_chunks"]) + 1),
        ("compressor length", f["compressor_len"], 10**6),
        ("tok_begin", c1["tok_begin"], g(c1["tok_begin"]) + 1),
        ("tok_end before tok_begin", c0["tok_end"], g(c0["tok_begin"]) - 1),
        ("pos_begin", c1["pos_begin"], g(c1["pos_begin"]) + 3),
        ("pos_end", c0["pos_end"], 2**31 - 1),
        ("key signature length", c0["n_key_sig"], g(c0["n_key_sig"]) - 1),
        ("embedding signature length", c0["n_emb_sig"], g(c0["n_emb_sig"]) + 128),
        ("L row positions length", c0["n_low_pos"], g(c0["n_low_pos"]) - 1),
        ("row signature length", c0["n_row_sig"], g(c0["n_row_sig"]) - 1),
        ("row signature longer than the chunk", c1["n_row_sig"], g(c1["n_row_sig"]) * 10**6),
        ("L type", c0["low"]["type"], 99),
        ("L type Q4_K", c0["low"]["type"], 12),
        ("H type of one chunk", c1["high"]["type"], 0 if g(c1["high"]["type"]) != 0 else 1),
        ("L entries", c0["low"]["n"], g(c0["low"]["n"]) + 1),
        ("L entries negative", c0["low"]["n"], -1),
        ("L entries overflow", c0["low"]["n"], 2**62),
        ("H entries above the chunk", c1["high"]["n"], 10**4),
        ("sink entries", lay["sink"]["n"], g(lay["sink"]["n"]) + 1),
        ("sink token count", f["n_sink_tokens"], g(f["n_sink_tokens"]) - 1),
        ("text position below -1", f["text_pos"], -2),
        ("text position inside the sink", f["text_pos"], g(f["n_sink_tokens"]) - 1),
        ("text position beyond 2^30", f["text_pos"], 2**30 + 1),
        # an M-RoPE text position bounds the entries' (temporal) positions: these lie beyond it
        ("text position before the entries", f["text_pos"], g(f["n_sink_tokens"])),
    ]
    # positions: an L row outside its chunk, an H entry far away, a sink entry out of order
    p_low = c1["low_pos"][0] + 4 * 3
    muts.append(("L row position outside the chunk", (p_low, "i"), 10**6))
    muts.append(("L segment position", (c1["low"]["pos"][0], "i"), -7))
    muts.append(("H position", (c0["high"]["pos"][0], "i"), 2**31 - 1))
    muts.append(("sink position", (lay["sink"]["pos"][0] + 4, "i"), 0))
    muts.append(("sink token id", (f["sink_tokens"][0], "i"), -3))
    return muts


def test_every_index_field_is_checked_against_the_others(saved, tmp_path):
    """Sizes, counts, types, positions and settings that disagree with each other are refused with a
    FormatError naming the problem, even when the checksums were re-sealed."""
    _, raw, lay = saved
    accepted = []
    for what, field, value in _field_mutations(raw, lay):
        try:
            _load_bytes(tmp_path, _mutated(raw, lay, field, value))
            accepted.append(what)
        except x2l_edge.FormatError:
            pass
    assert accepted == []
    # bytes after the last section, and a file cut anywhere
    with pytest.raises(x2l_edge.FormatError, match="trailing|after the last"):
        _load_bytes(tmp_path, raw + b"\0" * 64)
    for cut in (9, 100, len(raw) // 3, len(raw) - 1):
        with pytest.raises(x2l_edge.FormatError, match="truncated"):
            _load_bytes(tmp_path, raw[:cut])


def test_segment_size_overflow_is_refused(saved, tmp_path):
    """Defect 7: row_bytes * entries * n_layer * n_head_kv wrapped around (2^14 * 2^26 * 2^24 = 2^64 -> 0),
    so a sparse 256 MiB file passed the size checks; now every size is computed with overflow checks."""
    _, raw, lay = saved
    f = lay["fields"]
    d = bytearray(raw)
    for name, v in (("n_layer", 4096), ("n_head_kv", 4096), ("head_dim", 4096)):
        fmt.put(d, f[name], v)
    fmt.put(d, lay["sink"]["type"], 0)  # f32: 16 KiB rows
    fmt.put(d, lay["sink"]["n"], 2**26)
    if lay["version"] >= 3:
        fmt.reseal(d, lay)
    p = tmp_path / "huge.x2l"
    with open(p, "wb") as out:
        out.write(d)
        out.truncate(2**28 + len(d))  # sparse: room for the 2^26 positions
    with pytest.raises(x2l_edge.FormatError):
        _core.VideoIndex.load(str(p))


def test_random_resealed_mutations_never_crash(saved, tiny, tmp_path):
    """Random field and byte changes with re-sealed checksums: refused, or loaded and usable (scores from
    all three scorers and an answer), never a crash."""
    _, raw, lay = saved
    rng = random.Random(24)
    fields = [fld for fld in lay["fields"].values() if isinstance(fld[1], str) and fld[1] in "iIqQ"]
    for ch in lay["chunks"]:
        fields += [v for k, v in ch.items() if isinstance(v, tuple) and isinstance(v[1], str)]
        fields += [ch[s][k] for s in ("low", "high") for k in ("type", "n")]
    refused = used = 0
    for i in range(120):
        d = bytearray(raw)
        if i % 2:
            field = rng.choice(fields)
            value = rng.choice([0, 1, -1, 2**31 - 1, -2**31, fmt.get(raw, field) + rng.choice([-2, -1, 1, 2, 64])])
            if field[1] in "IQ":
                value %= 2 ** (8 * struct.calcsize(field[1]))
            fmt.put(d, field, value)
        else:
            for _ in range(4):
                d[rng.randrange(len(d))] = rng.randrange(256)
        if lay["version"] >= 3:
            fmt.reseal(d, lay)
        try:
            ix = _load_bytes(tmp_path, d)
            ctx = VideoContext(tiny, ix, question_suffix="")  # the fingerprint and sink ids meet the model
        except x2l_edge.Error:
            refused += 1
            continue
        for scorer in ("embedding", "keys", "maxsim", "attention"):
            s = ctx.scores("what happens?", scorer=scorer)
            assert s.shape == (ctx.n_chunks,)
        ctx.ask("what happens?", chunks=sorted({0, ctx.n_chunks - 1}), max_tokens=2)
        used += 1
    assert refused > 20 and used > 5, (refused, used)


# ------------------------------------------------------------------------------ fingerprint and checksums

def test_index_from_another_model_is_refused(saved, models):
    """Defect 6: same dimensions, other weights: the index's KV means nothing to this model."""
    path, _, _ = saved
    other = x2l_edge.Session(models[1], n_threads=2, kv_type="f32", n_ctx=512)
    with pytest.raises(x2l_edge.Error, match="different model"):
        VideoContext.load(other, path)


def test_flipped_kv_bytes_are_detected(saved, tiny, tmp_path):
    """Defect 6: one flipped bit in a chunk's L rows, H rows, sink or signature is a FormatError on load;
    with mmap=True the L rows are verified before their first use instead."""
    _, raw, lay = saved
    c2 = lay["chunks"][2]
    spots = {"L keys": c2["low"]["k"][0] + 5, "L values": c2["low"]["v"][0] + c2["low"]["v"][1] - 3,
             "H keys": c2["high"]["k"][0] + 17, "sink values": lay["sink"]["v"][0] + 9,
             "key signature": c2["key_sig"][0] + 2, "header": lay["fields"]["ratio_high"][0]}
    for what, off in spots.items():
        d = bytearray(raw)
        d[off] ^= 0x10
        with pytest.raises(x2l_edge.FormatError, match="checksum"):
            _load_bytes(tmp_path, d)
    d = bytearray(raw)
    d[spots["L keys"]] ^= 0x10
    ix = _load_bytes(tmp_path, d, mmap=True)  # L verified lazily
    ctx = VideoContext(tiny, ix, question_suffix="")
    ctx.ask("what happens?", chunks=[1], max_tokens=2)  # chunk 1 is intact
    with pytest.raises(x2l_edge.FormatError, match="checksum"):
        ctx.reload([2])
    with pytest.raises(x2l_edge.FormatError, match="checksum"):
        ctx.scores("what happens?", scorer="attention")  # reads every chunk's L keys


def test_old_format_is_refused_with_a_reindex_message(saved, tmp_path):
    _, raw, _ = saved
    for magic in (b"X2LIDX01", b"X2LIDX02", b"X2LIDX06"):
        with pytest.raises(x2l_edge.FormatError, match="index the video again"):
            _load_bytes(tmp_path, magic + raw[8:])


def test_format3_files_still_load(saved, tiny, tmp_path):
    """An index saved by the previous version (format 3: no text position) loads, into memory or mapped,
    as one without an M-RoPE text position and answers bit-identically to the same index in format 5;
    its checksums are verified as before."""
    path, raw, lay = saved
    assert lay["version"] == 5 and fmt.get(raw, lay["fields"]["text_pos"]) == -1
    old = fmt.to_format3(raw)
    assert fmt.layout(old)["version"] == 3
    ref = VideoContext.load(tiny, path, system="be brief")
    for mmap in (False, True):
        ix = _load_bytes(tmp_path, old, name=f"v3_{mmap}.x2l", mmap=mmap)
        assert ix.settings()["text_pos"] == -1
        ctx = VideoContext(tiny, ix, question_suffix=ref.question_suffix)
        for sel in ([], [0, 2]):
            np.testing.assert_array_equal(ctx.logits("what happens?", sel), ref.logits("what happens?", sel))
    bad = bytearray(old)
    bad[fmt.layout(old)["fields"]["ratio_high"][0]] ^= 1
    with pytest.raises(x2l_edge.FormatError, match="checksum"):
        _load_bytes(tmp_path, bad)


def test_text_position_needs_an_mrope_model(saved, tiny, tmp_path):
    """A (re-sealed) text position on an index whose entries it bounds loads, but a model without M-RoPE
    refuses it instead of continuing the question at a crafted position."""
    _, raw, lay = saved
    ix = _load_bytes(tmp_path, _mutated(raw, lay, lay["fields"]["text_pos"], fmt.get(raw, lay["fields"]["next_pos"])))
    with pytest.raises(x2l_edge.FormatError, match="M-RoPE"):
        VideoContext(tiny, ix, question_suffix="")


def test_mmap_and_copy_loads_answer_identically(saved, tiny):
    path, _, _ = saved
    a = VideoContext.load(tiny, path, system="be brief")
    b = VideoContext.load(tiny, path, system="be brief", mmap=True)
    assert not a.chunk_info(0)["low_mapped"] and b.chunk_info(0)["low_mapped"]
    for sel in ([], [1, 3]):
        np.testing.assert_array_equal(a.logits("what happens?", sel), b.logits("what happens?", sel))
    np.testing.assert_array_equal(a.scores("what happens?"), b.scores("what happens?"))


# ------------------------------------------------------------------ files that change or are not files

_CHILD = textwrap.dedent("""
    import os, sys, numpy as np, x2l_edge
    from x2l_edge.x2l import VideoContext
    model, path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    s = x2l_edge.Session(model, n_threads=1, kv_type="f32", n_ctx=512)
    ctx = VideoContext.load(s, path, system="be brief", **({"mmap": True} if mode == "mmap" else {}))
    sel = list(range(ctx.n_chunks))
    before = ctx.logits("what happens?", sel)
    raw = open(path, "rb").read()
    with open(path, "r+b") as f:                # in-place rewrite of the second half, then a cut
        f.seek(len(raw) // 2)
        f.write(bytes(len(raw) - len(raw) // 2))
        f.flush()
        os.fsync(f.fileno())
        f.truncate(len(raw) // 3)
    try:
        after = ctx.logits("what happens?", sel)
        print("SAME" if np.array_equal(before, after) else "CHANGED")
    except x2l_edge.FormatError as e:
        print("REFUSED", e)
""")


@pytest.mark.parametrize("mode", ["copy", "mmap"])
def test_index_changed_after_load_never_crashes(saved, models, tmp_path, mode):
    """Defect 3: the L tier was a MAP_SHARED view of the file: cutting the file gave SIGBUS, rewriting it
    changed answers silently. Default loads copy (answers unchanged); mmap=True loads notice the change."""
    path, raw, _ = saved
    p = tmp_path / f"{mode}.x2l"
    p.write_bytes(raw)
    r = subprocess.run([sys.executable, "-c", _CHILD, str(models[0]), str(p), mode], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    if mode == "copy":
        assert r.stdout.startswith("SAME"), r.stdout
    else:
        assert r.stdout.startswith("REFUSED") and "changed" in r.stdout, r.stdout


def test_fifo_and_other_non_files_are_refused(models, tmp_path):
    """Defect 5: a FIFO as the index (or model) path blocked forever in open()."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        import x2l_edge
        from x2l_edge import _core
        for what, fn in (("index", lambda p: _core.VideoIndex.load(p)), ("gguf", x2l_edge.Session),
                         ("gguf reader", _core.GGUFFile.open)):
            for p in ({str(fifo)!r}, "/dev/zero", {str(tmp_path)!r}):
                try:
                    fn(p)
                    print(what, p, "LOADED")
                except (x2l_edge.Error, IsADirectoryError) as e:
                    print(what, p, "ERROR", type(e).__name__, e)
        from x2l_edge.video import VideoError, open_video
        for p in ({str(fifo)!r}, "/dev/zero"):
            try:
                open_video(p)
                print("video", p, "LOADED")
            except VideoError as e:
                print("video", p, "ERROR", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 11 and all(" ERROR " in ln for ln in lines), r.stdout
    # a directory is an IsADirectoryError (docs/api.md), any other non-file an x2l_edge.Error
    assert all(("IsADirectoryError" in ln) == ln.split(" ERROR ")[0].endswith(str(tmp_path)) for ln in lines), r.stdout
    assert all("not a regular file" in ln or "is a directory" in ln for ln in lines), r.stdout


# ----------------------------------------------------------------------------------------- GGUF and model

def _gguf_one_tensor(ne, type_id=0, nbytes_after=64):
    name = b"t"
    head = struct.pack("<IIQQ", 0x46554747, 3, 1, 0)
    info = struct.pack("<Q", len(name)) + name + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne)
    info += struct.pack("<IQ", type_id, 0)
    data = head + info
    data += b"\0" * ((-len(data)) % 32)
    return data + b"\0" * nbytes_after


def test_gguf_element_count_overflow_is_refused(tmp_path):
    """Defect 8: [2^32]*4 elements wrapped to 0 bytes in 128-bit arithmetic and the tensor was accepted."""
    for ne in ([2**32] * 4, [2**40] * 4, [2**31, 2**31, 2**31, 2**31], [2**33, 2**33, 2**33, 2**33]):
        with pytest.raises(x2l_edge.FormatError, match="element|bytes|dimension"):
            _core.GGUFFile.from_bytes(_gguf_one_tensor(ne))
        p = tmp_path / "big.gguf"
        p.write_bytes(_gguf_one_tensor(ne))
        with pytest.raises(x2l_edge.FormatError):
            _core.GGUFFile.open(str(p))
    f = _core.GGUFFile.from_bytes(_gguf_one_tensor([16]))  # the same file with a sane shape loads
    assert f.tensors()[0][0] == "t"


def _rewrite(src_path, out_path, *, set_keys=None, shrink_vocab=0):
    """Copy a GGUF, changing metadata values (set_keys) or dropping the last tokenizer entries."""
    import gguf

    src = gguf.GGUFReader(str(src_path))
    arch = src.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out_path), arch=arch)
    for field in src.fields.values():
        if field.name in ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
            continue
        vt = field.types[0]
        val = field.contents()
        if set_keys and field.name in set_keys:
            val = set_keys[field.name]
        if vt == gguf.GGUFValueType.ARRAY:
            if shrink_vocab and field.name.startswith("tokenizer.ggml.") and field.name != "tokenizer.ggml.merges":
                val = val[:-shrink_vocab]
            w.add_key_value(field.name, val, vt, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, val, vt)
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(out_path)


def test_model_hyper_parameters_are_checked(models, tmp_path):
    """Defect 9: a NaN RMS epsilon loaded (every logit NaN); a tokenizer smaller than the embedding table
    loaded and failed at the first sampled id it cannot spell."""
    src = models[0]
    for key, val in (("qwen2.attention.layer_norm_rms_epsilon", math.nan),
                     ("qwen2.attention.layer_norm_rms_epsilon", math.inf),
                     ("qwen2.attention.layer_norm_rms_epsilon", -1e-6),
                     ("qwen2.rope.freq_base", math.nan),
                     ("qwen2.rope.freq_base", math.inf)):
        with pytest.raises(x2l_edge.FormatError, match=key.split(".", 1)[1].split(".")[-1].split("_")[0]):
            x2l_edge.Session(_rewrite(src, tmp_path / "h.gguf", set_keys={key: val}))
    with pytest.raises(x2l_edge.FormatError, match="tokenizer"):
        x2l_edge.Session(_rewrite(src, tmp_path / "v.gguf", shrink_vocab=3))
    s = x2l_edge.Session(_rewrite(src, tmp_path / "ok.gguf"))  # the unchanged copy loads
    assert s.tokenize("hello")
