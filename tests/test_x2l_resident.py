"""Resident scorers (never read the L tier) and selection by the shape of the scores (issue 23), on the
real SmolLM2-135M weights."""
from __future__ import annotations

import numpy as np
import pytest

import x2l_edge
import index_format as fmt
from x2l_edge import X2LOptions
from x2l_edge.x2l import VideoContext, prefill_chunks, split_template

FILLER = "The grass is green and the sky is blue. We walked along the road and talked about the weather. "
PLANTED = "The purple xylophone sang a melody. The purple xylophone sang a melody. "
QUESTION = "What did the purple xylophone sing?"
PLANTED_B = "The golden trombone played a march. The golden trombone played a march. "
RESIDENT = ("high", "high_keys", "keys", "maxsim")


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return x2l_edge.Session(smollm2_path, n_threads=2, n_ctx=256)


def _planted_chunks(s, pos, n=5, other=None):
    """n chunks of 64 filler tokens; chunk pos holds PLANTED, chunk `other` PLANTED_B."""
    text = {pos: FILLER + PLANTED + FILLER, other: FILLER + PLANTED_B + FILLER}
    return [s.tokenize(text.get(i, FILLER * 3), special=False)[:64] for i in range(n)]


def _planted(s, pos, n=5, other=None, **kw):
    chunks = _planted_chunks(s, pos, n, other)
    prefix, suffix = split_template(s, "be brief")
    index, _ = prefill_chunks(s, chunks, sink_ids=s.tokenize(prefix), ratio_low=2, ratio_high=16, **kw)
    return VideoContext(s, index, question_suffix=suffix)


@pytest.fixture(scope="module")
def planted2(smol):
    return _planted(smol, 2)


def test_resident_scorers_find_the_planted_chunk(smol):
    """The chunk holding the question's content, among filler chunks, ranks first for the H-tier scorers,
    early, middle and last (the last is nearest to the question: recency must not decide), in both
    prefill modes."""
    for two_pass, positions in ((True, (1, 4)), (False, (0, 2))):
        for pos in positions:
            ctx = _planted(smol, pos, two_pass=two_pass)
            for scorer in ("high", "high_keys", "maxsim"):
                r = ctx.scores(QUESTION, scorer)
                assert r.shape == (5,) and np.isfinite(r).all()
                assert int(np.argmax(r)) == pos, (scorer, two_pass, pos, r)


def test_scan_bytes_are_measured_per_tier(smol, planted2):
    """score_stats counts the index rows each scan reads: the attention scorer every chunk's L keys of
    layers 1.. (f16: 128 bytes per 64-dim key), the high scorer the H keys (q8_0: 68 bytes) and no L
    byte, high_keys the H keys and the signatures (f32), keys the signatures alone."""
    ctx = planted2
    info = smol.info
    L, H, hd = info["n_layer"], info["n_head_kv"], info["head_dim"]
    n_low = sum(ctx.chunk_info(c)["low_entries"] for c in range(ctx.n_chunks))
    n_high = sum(ctx.chunk_info(c)["high_entries"] for c in range(ctx.n_chunks))
    assert ctx.chunk_info(0)["low_type"] == "f16" and ctx.chunk_info(0)["high_type"] == "q8_0"
    sig = (L - 1) * H * 8 * ctx.n_chunks * hd * 4  # 8 signature keys per chunk, layer and KV head
    want = {"attention": ((L - 1) * H * n_low * hd * 2, 0, 0),
            "high": (0, (L - 1) * H * n_high * (hd // 32) * 34, 0),
            "high_keys": (0, (L - 1) * H * n_high * (hd // 32) * 34, sig),
            "keys": (0, 0, sig)}
    for scorer, (low, high, sigb) in want.items():
        ctx.scores(QUESTION, scorer)
        st = ctx.score_stats()
        assert (st["low_bytes"], st["high_bytes"], st["signature_bytes"]) == (low, high, sigb), (scorer, st)
        assert st["pass_seconds"] > 0 and st["scan_seconds"] > 0
    # maxsim: every chunk's f16 signature rows (one per 4 chunk tokens, at most one per distinct token), no pass
    rows = sum(len(_signature_rows_reference(smol, ids)) for ids in _planted_chunks(smol, 2))
    ctx.scores(QUESTION, "maxsim")
    st = ctx.score_stats()
    assert (st["low_bytes"], st["high_bytes"], st["signature_bytes"]) == (0, 0, rows * info["n_embd"] * 2), st
    assert st["pass_seconds"] == 0 and st["scan_seconds"] > 0


def test_resident_scorers_never_touch_the_l_tier(smol, planted2, tmp_path):
    """A saved index whose every L row (keys and values of every chunk) is overwritten with NaN bits, loaded
    with mmap=True (L rows checked lazily, before their first use): the resident scorers give exactly the
    scores of the intact index, while the attention scorer, which reads the L tier, refuses it."""
    path = tmp_path / "v.x2l"
    planted2.save(path)
    raw = bytearray(path.read_bytes())
    lay = fmt.layout(bytes(raw))
    for ch in lay["chunks"]:
        for part in ("k", "v"):
            off, n = ch["low"][part]
            raw[off:off + n] = b"\xff" * n  # f16 NaN
    bad = tmp_path / "poisoned.x2l"
    bad.write_bytes(bytes(raw))
    with pytest.raises(x2l_edge.FormatError):
        VideoContext.load(smol, bad, system="be brief")  # read into memory: every checksum verified
    ctx = VideoContext.load(smol, bad, system="be brief", mmap=True)
    for scorer in RESIDENT + ("embedding",):
        np.testing.assert_array_equal(ctx.scores(QUESTION, scorer), planted2.scores(QUESTION, scorer), err_msg=scorer)
        assert ctx.score_stats()["low_bytes"] == 0
    assert ctx.select(question=QUESTION, scorer="high", top_k=1) == [2]
    with pytest.raises(x2l_edge.FormatError, match="checksum"):
        ctx.scores(QUESTION, "attention")
    # an H-only answer needs no L row either
    assert isinstance(ctx.ask(QUESTION, chunks=[], max_tokens=2), str)


def _shape_cut_reference(scores, rule, max_k, mass_p):
    """The number of ranked chunks the gap / mass rules keep (cpp/x2l/select.h SelectRule), in numpy."""
    s = np.sort(np.asarray(scores, dtype=np.float32))[::-1]  # the float scores the C++ rule sees
    k_max = min(max_k, len(s))
    if k_max < 2:
        return k_max
    if rule == "gap":
        gaps = s[:k_max - 1] - s[1:k_max]
        return int(np.argmax(gaps)) + 1  # the first of the largest drops
    s = s.astype(np.float64)
    sd = s.std()
    if sd == 0:
        return k_max
    w = np.exp((s - s[0]) / sd)
    cum = np.cumsum(w / w.sum())
    return min(k_max, int(np.searchsorted(cum, mass_p * (1 - 1e-12))) + 1)


def test_score_shape_selection_follows_its_rule(planted2):
    ctx = planted2
    scores = [0.1, 0.9, 0.5, 0.8, 0.2]  # sorted 0.9 0.8 0.5 0.2 0.1: drops .1 .3 .3 .1
    assert ctx.select(scores, rule="gap") == [1, 3]  # the first of the two largest drops
    assert ctx.select(scores, rule="gap", max_k=2) == [1]
    assert ctx.select([0.0, 5.0, 0.1, 0.2, 0.3], rule="gap") == [1]
    assert ctx.select([0.0, 0.0, 0.0, 0.0, 10.0], rule="mass", mass_p=0.5) == [4]
    assert ctx.select([0.0, 0.0, 0.0, 0.0, 10.0], rule="mass", mass_p=0.9) == [0, 1, 2, 4]  # 4 chunks, ties by index
    assert ctx.select([1.0] * 5, rule="mass", max_k=3) == [0, 1, 2]  # all equal: max_k
    rng = np.random.default_rng(7)
    for _ in range(200):
        v = (rng.standard_normal(5) * rng.choice([0.01, 1.0, 100.0])).astype(np.float32)
        if rng.random() < 0.3:
            v[rng.integers(5)] += 5 * abs(v).max()
        for rule in ("gap", "mass"):
            for max_k in (1, 3, 6):
                p = float(rng.choice([0.5, 0.8, 0.9, 1.0]))
                got = ctx.select([float(x) for x in v], rule=rule, max_k=max_k, mass_p=p)
                k = _shape_cut_reference(v, rule, max_k, p)
                assert got == sorted(np.argsort(-v, kind="stable")[:k].tolist()), (rule, max_k, p, v)
    # a byte budget caps the rule's cut in rank order and takes nothing beyond it
    extra = [ctx.chunk_info(c)["low_bytes"] - ctx.chunk_info(c)["high_bytes"] for c in range(5)]
    assert ctx.select(scores, rule="gap", budget_bytes=extra[1]) == [1]
    assert ctx.select(scores, rule="gap", budget_bytes=extra[1] + extra[3]) == [1, 3]
    # include_first adds chunk 0 to the rule's chunks
    assert ctx.select(scores, rule="gap", include_first=True) == [0, 1, 3]
    # your own rule
    assert ctx.select(scores, rule=lambda s: [int(np.argmin(s)), 4, 4]) == [0, 4]
    # the answer path takes the rule too
    ctx.ask(QUESTION, scores=scores, rule="gap", max_tokens=1)
    assert ctx.selected == [1, 3]


def test_selection_and_scorer_options_are_checked(smol, planted2):
    ctx = planted2
    scores = [0.1, 0.9, 0.5, 0.8, 0.2]
    with pytest.raises(ValueError, match="rule must be one of"):
        ctx.select(scores, rule="largest")
    with pytest.raises(ValueError, match="max_k"):
        ctx.select(scores, rule="gap", max_k=0)
    for p in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mass_p"):
            ctx.select(scores, rule="mass", mass_p=p)
    with pytest.raises(TypeError, match="mass_p"):
        ctx.select(scores, rule="mass", mass_p="0.9")
    with pytest.raises(ValueError, match="chunks chosen by rule"):
        ctx.select(scores, rule=lambda s: [9])
    with pytest.raises(ValueError, match="infinity|finite"):
        ctx.select([0.1, float("inf"), 0.2, 0.3, 0.4], rule="gap")
    with pytest.raises(ValueError, match="scorer must be one of"):
        ctx.scores(QUESTION, "hgih")
    for bad, err in ((dict(select="largest"), ValueError), (dict(max_k=0), ValueError), (dict(mass_p=0.0), ValueError),
                     (dict(mass_p=2.0), ValueError), (dict(mass_p="x"), TypeError), (dict(scorer="hgih"), ValueError)):
        with pytest.raises(err):
            X2LOptions(**bad)
        with pytest.raises(err):
            X2LOptions().replace(**bad)
    # the options reach the context: its default rule and scorer
    c2 = smol.prefill_text(FILLER * 8 + PLANTED + FILLER * 8, chunk_tokens=48, select="gap", max_k=4, scorer="high",
                           progress=False)
    assert c2.default_selection == {"rule": "gap", "max_k": 4, "mass_p": 0.9} and c2.default_scorer == "high"
    v = c2.scores(QUESTION)
    assert c2.score_stats()["low_bytes"] == 0
    assert c2.select(v) == c2.select(v, rule="gap", max_k=4)


# ------------------------------------------------------------------------------------------ maxsim

def _signature_rows_reference(s, ids, stride=4):
    """select.h distinct_input_rows in numpy: the chunk's distinct input rows, the ceil(n / stride)
    farthest from their mean, in input order, as f16 [m, n_embd]."""
    e = np.asarray(s._s.embed_tokens(ids), dtype=np.float32)
    _, first = np.unique(e, axis=0, return_index=True)
    u = e[np.sort(first)]
    d = ((u.astype(np.float64) - u.astype(np.float64).mean(0)) ** 2).sum(1)
    keep = np.argsort(-d, kind="stable")[:-(-len(ids) // stride)]
    return u[np.sort(keep)].astype(np.float16)


def _maxsim_reference(q, sigs):
    """score(c) = sum over question tokens t of (max cosine of t with a row of c - median over chunks)."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    m = np.stack([(qn @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T).max(1) for r in sigs], 1)  # [t, chunk]
    return (m - np.median(m, axis=1, keepdims=True)).sum(0)


def test_maxsim_matches_a_numpy_reference(smol, planted2, tmp_path):
    """The saved signature rows are, bit for bit, the reference's selection rounded to f16; the scores
    equal the reference's on those rows and the question's content tokens (1e-5)."""
    path = tmp_path / "v.x2l"
    planted2.save(path)
    raw = path.read_bytes()
    lay = fmt.layout(raw)
    assert lay["version"] == 5
    E = smol.info["n_embd"]
    sigs = []
    for ch, ids in zip(lay["chunks"], _planted_chunks(smol, 2)):
        off, n = ch["row_sig"]
        got = np.frombuffer(raw, dtype=np.float16, count=n, offset=off).reshape(-1, E)
        want = _signature_rows_reference(smol, ids)
        assert got.shape == want.shape and 12 <= len(got) <= 16  # 64 tokens / 4, or every distinct row
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
        sigs.append(got.astype(np.float64))
    ids = planted2.question_ids(QUESTION, answer_prefix=False)
    head, tail = len(smol.tokenize(planted2.question_prefix)), len(smol.tokenize(planted2.question_suffix))
    q = np.asarray(smol._s.embed_tokens(ids[head:len(ids) - tail]), dtype=np.float64)
    np.testing.assert_allclose(planted2.scores(QUESTION, "maxsim"), _maxsim_reference(q, sigs), rtol=1e-5, atol=1e-5)


def test_maxsim_ranks_the_named_chunk_above_a_distractor(smol):
    """Two planted chunks, one per subject: the question's subject decides, wherever the other one sits."""
    for pos, other in ((1, 3), (3, 1), (4, 0)):
        ctx = _planted(smol, pos, other=other)
        r = ctx.scores(QUESTION, "maxsim")
        assert int(np.argmax(r)) == pos, (pos, other, r)
        r = ctx.scores("What did the golden trombone play?", "maxsim")
        assert int(np.argmax(r)) == other, (pos, other, r)


@pytest.mark.parametrize("old_format", [3, 4])
def test_older_indexes_still_load_and_maxsim_says_why_it_cannot_score(smol, planted2, tmp_path, old_format):
    """An index saved before the row signatures (formats 3 and 4) loads and answers as before; maxsim
    raises a clear error. Saved again it stays without signatures (format 5, none). A NaN in a row
    signature, or a signature that is not whole rows, is refused at load (checksums re-sealed)."""
    path = tmp_path / "v5.x2l"
    planted2.save(path)
    raw = path.read_bytes()
    old = tmp_path / "old.x2l"
    old.write_bytes(fmt.to_format3(raw) if old_format == 3 else fmt.to_format4(raw))
    assert old.read_bytes()[:8] == b"X2LIDX0%d" % old_format
    ctx = VideoContext.load(smol, old, system="be brief")
    for scorer in ("attention", "high", "embedding"):
        np.testing.assert_array_equal(ctx.scores(QUESTION, scorer), planted2.scores(QUESTION, scorer))
    with pytest.raises(x2l_edge.Error, match="no row signatures.*format 3 or 4"):
        ctx.scores(QUESTION, "maxsim")
    assert ctx.chunk_info(0)["signature_rows"] == 0 and planted2.chunk_info(0)["signature_rows"] > 0
    with pytest.warns(RuntimeWarning, match="no row signatures"):  # a maxsim default falls back to attention
        fallback = VideoContext.load(smol, old, system="be brief", default_scorer="maxsim")
    assert fallback.default_scorer == "attention"
    again = tmp_path / "again.x2l"
    ctx.save(again)
    assert again.read_bytes()[:8] == b"X2LIDX05"
    with pytest.raises(x2l_edge.Error, match="no row signatures"):
        VideoContext.load(smol, again, system="be brief").scores(QUESTION, "maxsim")
    lay = fmt.layout(raw)
    off, _ = lay["chunks"][3]["row_sig"]
    for field_off, value, fmt_char in ((off + 6, 0x7E00, "H"),  # an f16 NaN
                                       (lay["chunks"][3]["n_row_sig"][0], 7, "Q")):  # not a whole row
        d = bytearray(raw)
        fmt.put(d, (field_off, fmt_char), value)
        fmt.reseal(d, lay, field_off)
        bad = tmp_path / "bad.x2l"
        bad.write_bytes(bytes(d))
        with pytest.raises(x2l_edge.FormatError):
            VideoContext.load(smol, bad, system="be brief")
