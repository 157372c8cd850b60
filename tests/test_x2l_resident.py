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
RESIDENT = ("high", "high_keys", "keys")


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return x2l_edge.Session(smollm2_path, n_threads=2, n_ctx=256)


def _planted(s, pos, n=5, **kw):
    chunks = [s.tokenize(FILLER * 3 if i != pos else FILLER + PLANTED + FILLER, special=False)[:64] for i in range(n)]
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
            for scorer in ("high", "high_keys"):
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
