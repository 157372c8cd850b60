"""Video-X²L core on text chunks: exactness against the plain forward, tiers, reload, save/load, scorers."""
from __future__ import annotations

import numpy as np
import pytest

import x2l_edge
from x2l_edge import _core
from x2l_edge.x2l import VideoContext, prefill_chunks, split_template

CHUNK = 24


def _chunks(session, n_chunks=4):
    text = ("the model reads a long video and answers questions about what happens in each scene "
            "while the cache keeps only the tokens that matter for the next frame. ") * 6
    ids = session.tokenize(text, special=False)[: n_chunks * CHUNK]
    return [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]


def _context(session, chunks, **kw):
    prefix, suffix = split_template(session, "be brief")
    index, _ = prefill_chunks(session, chunks, sink_ids=session.tokenize(prefix), **kw)
    return VideoContext(session, index, question_suffix=suffix)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """Tiny random qwen2 with head_dim 32 (so q8_0/q4_0 KV rows fit), GQA 4:2: (HF dir, f32 GGUF)."""
    import convert
    import tiny_models

    d = tmp_path_factory.mktemp("x2l_tiny")
    hf = tiny_models.make_tiny_qwen2(d / "hf", seed=5, hidden_size=128, intermediate_size=256)
    path = d / "m.gguf"
    convert.convert(str(hf), str(path), "f32", progress=False)
    return hf, path


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    return x2l_edge.Session(tiny_hf[1], n_threads=2, kv_type="f32", n_ctx=512)


def test_snapkv_keeps_the_entries_reference_attention_votes_for(tiny, tiny_hf):
    """The training-free compressor against transformers' own attention probabilities: per layer and KV
    head, an entry's vote is the attention it gets from the chunk's queries (summed over the group's
    query heads, divided by the queries that can see it), smoothed over 5 neighbours; the kept L
    entries must be the top half by that vote."""
    import torch
    import transformers

    prefix, _ = split_template(tiny, "be brief")
    sink = tiny.tokenize(prefix)
    chunk = _chunks(tiny, n_chunks=2)[0] + _chunks(tiny, n_chunks=2)[1]  # 48 tokens
    index, _ = prefill_chunks(tiny, [chunk], sink_ids=sink, ratio_low=2, ratio_high=8, low_type="f32",
                              high_type="f32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf[0], dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        att = model(torch.tensor([sink + chunk]), output_attentions=True).attentions
    S, n = len(sink), len(chunk)
    cfg = model.config
    H, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    kept = np.array(index.low_positions(0)).reshape(cfg.num_hidden_layers, H, n // 2) - S
    for layer in range(cfg.num_hidden_layers):
        a = att[layer][0].numpy()  # [n_head, T, T]
        for h in range(H):
            votes = a[h * group:(h + 1) * group, S:, S:].sum((0, 1)) / (n - np.arange(n))
            smooth = np.array([votes[max(0, i - 2):i + 3].mean() for i in range(n)])
            k = kept[layer, h]
            dropped = np.setdiff1d(np.arange(n), k)
            assert len(np.unique(k)) == n // 2
            # the kept set is the top half (up to float noise at a tie)
            assert smooth[k].min() >= smooth[dropped].max() - 1e-5 * smooth.max(), (layer, h)


def _smooth_top(votes, m, kernel=5):
    """Indices of the m entries of highest neighbour-averaged importance (compress.cpp select_entries)."""
    h = kernel // 2
    n = len(votes)
    smooth = np.array([votes[max(0, i - h):i + h + 1].mean() for i in range(n)])
    return smooth


def test_kvzip_keeps_the_entries_a_reconstruction_pass_attends_to(tiny, tiny_hf):
    """compressor='kvzip' against transformers: the chunk, the repeat prompt and the chunk again run as one
    sequence after the sink; an entry's importance is the largest attention probability any row of the
    prompt or the copy gives it, over the KV head's query heads; smoothed over 5 neighbours, the kept L
    entries must be the top half, and the index must hold the original's K/V rows (not the copy's)."""
    import torch
    import transformers

    prefix, _ = split_template(tiny, "be brief")
    sink = tiny.tokenize(prefix)
    chunk = _chunks(tiny, n_chunks=2)[0] + _chunks(tiny, n_chunks=2)[1]  # 48 tokens
    prompt = tiny.tokenize("\n\nRepeat the text above exactly:\n", special=False)
    index, _ = prefill_chunks(tiny, [chunk], sink_ids=sink, ratio_low=2, ratio_high=8, low_type="f32",
                              high_type="f32", compressor="kvzip", repeat_prompt=prompt)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf[0], dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        out = model(torch.tensor([sink + chunk + prompt + chunk]), output_attentions=True, use_cache=True)
    att = out.attentions
    S, n, r = len(sink), len(chunk), len(prompt)
    cfg = model.config
    H, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    kept = np.array(index.low_positions(0)).reshape(cfg.num_hidden_layers, H, n // 2) - S
    for layer in range(cfg.num_hidden_layers):
        a = att[layer][0].numpy()  # [n_head, T, T]
        for h in range(H):
            votes = a[h * group:(h + 1) * group, S + n:, S:S + n].max(axis=(0, 1))
            smooth = _smooth_top(votes, n // 2)
            k = kept[layer, h]
            dropped = np.setdiff1d(np.arange(n), k)
            assert len(np.unique(k)) == n // 2
            assert smooth[k].min() >= smooth[dropped].max() - 1e-5 * smooth.max(), (layer, h)
    # the kept rows are the original chunk's keys (position S + i), not the copy's (S + n + r + i)
    keys = out.past_key_values.layers[0].keys[0].numpy() if hasattr(out.past_key_values, "layers") else \
        out.past_key_values[0][0][0].numpy()  # [H, T, head_dim] post-RoPE
    got = np.frombuffer(index.low_rows(0, 0, 1), np.float32).reshape(n // 2, -1)
    np.testing.assert_allclose(got, keys[1, S + kept[0, 1]], rtol=1e-4, atol=1e-4)


def test_snapkv_max_votes_keep_the_entries_some_query_attends_to_most(tiny, tiny_hf):
    """snapkv with max_votes=True (pooled votes) against transformers: an entry's importance is the largest
    attention probability any query of the chunk gives it over the KV head's query heads (no division by
    the queries that see it); smoothed over 5 neighbours, the kept L entries must be the top half."""
    import torch
    import transformers

    prefix, _ = split_template(tiny, "be brief")
    sink = tiny.tokenize(prefix)
    chunk = _chunks(tiny, n_chunks=2)[0] + _chunks(tiny, n_chunks=2)[1]  # 48 tokens
    index, _ = prefill_chunks(tiny, [chunk], sink_ids=sink, ratio_low=2, ratio_high=8, low_type="f32",
                              high_type="f32", max_votes=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf[0], dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        att = model(torch.tensor([sink + chunk]), output_attentions=True).attentions
    S, n = len(sink), len(chunk)
    cfg = model.config
    H, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    kept = np.array(index.low_positions(0)).reshape(cfg.num_hidden_layers, H, n // 2) - S
    for layer in range(cfg.num_hidden_layers):
        a = att[layer][0].numpy()  # [n_head, T, T]
        for h in range(H):
            smooth = _smooth_top(a[h * group:(h + 1) * group, S:, S:].max(axis=(0, 1)), n // 2)
            k = kept[layer, h]
            dropped = np.setdiff1d(np.arange(n), k)
            assert len(np.unique(k)) == n // 2
            assert smooth[k].min() >= smooth[dropped].max() - 1e-5 * smooth.max(), (layer, h)


def test_keydiff_keeps_the_most_distinctive_keys(tiny):
    """compressor='keydiff': per layer and KV head the kept L entries are the top half by minus the cosine
    similarity of each pre-RoPE key to the chunk's mean pre-RoPE key (smoothed over 5 neighbours),
    recomputed here from the chunk's full keys (an uncompressed index of the same chunk: the first chunk's
    L pass sees only the sink, so its keys are the same)."""
    prefix, _ = split_template(tiny, "be brief")
    sink = tiny.tokenize(prefix)
    chunk = _chunks(tiny, n_chunks=2)[0] + _chunks(tiny, n_chunks=2)[1]
    kw = dict(sink_ids=sink, ratio_high=8, low_type="f32", high_type="f32")
    comp, _ = prefill_chunks(tiny, [chunk], ratio_low=2, compressor="keydiff", **kw)
    full, _ = prefill_chunks(tiny, [chunk], ratio_low=1, compressor="keydiff", **kw)
    info = tiny.info
    L, H, hd, n, S = info["n_layer"], info["n_head_kv"], info["head_dim"], len(chunk), len(sink)
    theta = float(tiny._s.metadata("qwen2.rope.freq_base") or 10000.0)
    pos = np.arange(S, S + n)
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = -pos[:, None] * inv[None, :]
    kept = np.array(comp.low_positions(0)).reshape(L, H, n // 2) - S
    for layer in range(L):
        for h in range(H):
            k = np.frombuffer(full.low_rows(0, layer, h), np.float32).reshape(n, hd).astype(np.float64)
            # undo NEOX RoPE (qwen2: rotate halves)
            x1, x2 = k[:, :hd // 2], k[:, hd // 2:]
            pre = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x1 * np.sin(ang) + x2 * np.cos(ang)], 1)
            mean = pre.mean(0)
            imp = -(pre @ mean) / (np.linalg.norm(pre, axis=1) * np.linalg.norm(mean))
            smooth = _smooth_top(imp, n // 2)
            kk = kept[layer, h]
            dropped = np.setdiff1d(np.arange(n), kk)
            assert smooth[kk].min() >= smooth[dropped].max() - 1e-5, (layer, h)


def _distinct_chunk(session, n=48):
    """n different token ids: no two keys of layer 0 tie (repeated text would give identical pre-RoPE keys,
    whose order within a tie is float noise)."""
    rng = np.random.default_rng(7)
    return [int(t) for t in rng.choice(np.arange(10, min(session.info["n_vocab"], 2000)), n, replace=False)]


def _ranks(x):
    """Ranks in [0, 1] in the compressor's order (compress.cpp importance_ranks: ascending, ties by entry)."""
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x)) / (len(x) - 1)
    return r


def _pre_rope_keys(session, full_index, S, n):
    """[L, H, n, head_dim] pre-RoPE keys of chunk 0 of an uncompressed f32 index (NEOX RoPE undone here)."""
    info = session.info
    L, H, hd = info["n_layer"], info["n_head_kv"], info["head_dim"]
    theta = float(session._s.metadata("qwen2.rope.freq_base") or 10000.0)
    ang = -np.arange(S, S + n)[:, None] * (theta ** (-np.arange(0, hd, 2) / hd))[None, :]
    out = np.zeros((L, H, n, hd))
    for layer in range(L):
        for h in range(H):
            k = np.frombuffer(full_index.low_rows(0, layer, h), np.float32).reshape(n, hd).astype(np.float64)
            x1, x2 = k[:, :hd // 2], k[:, hd // 2:]
            out[layer, h] = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x1 * np.sin(ang) + x2 * np.cos(ang)], 1)
    return out


def _keydiff_ref(session, full_index, S, n):
    """KeyDiff importance [L, H, n]: minus the cosine of each pre-RoPE key to the chunk's mean pre-RoPE key."""
    pre = _pre_rope_keys(session, full_index, S, n)
    mean = pre.mean(2, keepdims=True)
    return -(pre * mean).sum(-1) / (np.linalg.norm(pre, axis=-1) * np.linalg.norm(mean, axis=-1))


def test_merge_folds_dropped_values_into_the_more_similar_kept_neighbour(tiny):
    """merge=True (keydiff): the same entries and keys as without merging; each kept entry's value is the
    weighted mean of its own value (weight 1) and the values of the dropped entries that chose it: a dropped
    entry goes to the kept entry just before or just after it in time whose pre-RoPE key is more similar
    (cosine), with weight max(0, cosine). Recomputed here from the chunk's full f32 K/V."""
    prefix, _ = split_template(tiny, "be brief")
    sink = tiny.tokenize(prefix)
    chunk = _distinct_chunk(tiny)
    kw = dict(sink_ids=sink, ratio_high=8, low_type="f32", high_type="f32", compressor="keydiff")
    merged, _ = prefill_chunks(tiny, [chunk], ratio_low=2, merge=True, **kw)
    plain, _ = prefill_chunks(tiny, [chunk], ratio_low=2, **kw)
    full, _ = prefill_chunks(tiny, [chunk], ratio_low=1, **kw)
    L, H, hd, n, S = tiny.info["n_layer"], tiny.info["n_head_kv"], tiny.info["head_dim"], len(chunk), len(sink)
    assert merged.low_positions(0) == plain.low_positions(0)
    pre = _pre_rope_keys(tiny, full, S, n)
    kept = np.array(merged.low_positions(0)).reshape(L, H, n // 2) - S
    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    for layer in range(L):
        for h in range(H):
            assert merged.low_rows(0, layer, h) == plain.low_rows(0, layer, h)  # keys untouched
            v = np.frombuffer(full.low_rows(0, layer, h, value=True), np.float32).reshape(n, hd).astype(np.float64)
            k = list(kept[layer, h])
            acc, wsum = v[k].copy(), np.ones(len(k))
            for e in np.setdiff1d(np.arange(n), k):
                cands = [i for i in (np.searchsorted(k, e) - 1, np.searchsorted(k, e)) if 0 <= i < len(k)]
                sims = [cos(pre[layer, h, e], pre[layer, h, k[i]]) for i in cands]
                j = int(np.argmax(sims))
                w = max(0.0, sims[j])
                acc[cands[j]] += w * v[e]
                wsum[cands[j]] += w
            got = np.frombuffer(merged.low_rows(0, layer, h, value=True), np.float32).reshape(-1, hd)
            np.testing.assert_allclose(got, acc / wsum[:, None], rtol=1e-4, atol=1e-5)
            assert not np.allclose(got, v[k])  # something was merged


def test_merge_min_similarity_merges_only_near_duplicates(tiny):
    """merge_min_similarity=t: a dropped entry is merged (as above) only when its best cosine with a kept
    neighbour is >= t; below it the value is dropped. t = 0 is plain merge, t = 1 keeps the kept rows'
    own values. Checked against the numpy recomputation at the median best cosine, so some merge and some
    do not."""
    prefix, _ = split_template(tiny, "be brief")
    sink = tiny.tokenize(prefix)
    chunk = _distinct_chunk(tiny)
    kw = dict(sink_ids=sink, ratio_low=2, ratio_high=8, low_type="f32", high_type="f32", compressor="keydiff")
    plain, _ = prefill_chunks(tiny, [chunk], **kw)
    full, _ = prefill_chunks(tiny, [chunk], **{**kw, "ratio_low": 1})
    L, H, hd, n, S = tiny.info["n_layer"], tiny.info["n_head_kv"], tiny.info["head_dim"], len(chunk), len(sink)
    pre = _pre_rope_keys(tiny, full, S, n)
    kept = np.array(plain.low_positions(0)).reshape(L, H, n // 2) - S
    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    best = {}  # (layer, head, dropped entry) -> (kept slot, cosine)
    for layer in range(L):
        for h in range(H):
            k = list(kept[layer, h])
            for e in np.setdiff1d(np.arange(n), k):
                cands = [i for i in (np.searchsorted(k, e) - 1, np.searchsorted(k, e)) if 0 <= i < len(k)]
                sims = [cos(pre[layer, h, e], pre[layer, h, k[i]]) for i in cands]
                best[layer, h, e] = cands[int(np.argmax(sims))], max(sims)
    t = float(np.median([c for _, c in best.values() if c > 0]))
    merged, _ = prefill_chunks(tiny, [chunk], merge=True, merge_min_similarity=t, **kw)
    untouched, _ = prefill_chunks(tiny, [chunk], merge=True, merge_min_similarity=1.0, **kw)
    n_merged = n_kept_alone = 0
    for layer in range(L):
        for h in range(H):
            v = np.frombuffer(full.low_rows(0, layer, h, value=True), np.float32).reshape(n, hd).astype(np.float64)
            k = list(kept[layer, h])
            acc, wsum = v[k].copy(), np.ones(len(k))
            for e in np.setdiff1d(np.arange(n), k):
                slot, c = best[layer, h, e]
                if c >= t:
                    acc[slot] += c * v[e]
                    wsum[slot] += c
            n_merged += int((wsum > 1).sum())
            n_kept_alone += int((wsum == 1).sum())
            got = np.frombuffer(merged.low_rows(0, layer, h, value=True), np.float32).reshape(-1, hd)
            np.testing.assert_allclose(got, acc / wsum[:, None], rtol=1e-4, atol=1e-5)
            same = np.frombuffer(untouched.low_rows(0, layer, h, value=True), np.float32).reshape(-1, hd)
            np.testing.assert_allclose(same, v[k], rtol=1e-6, atol=1e-6)
    assert n_merged > 0 and n_kept_alone > 0


@pytest.mark.parametrize("scope", ["layers", "all"])
def test_pooled_scopes_keep_the_top_mean_rank(tiny, scope):
    """pool_scope='layers' / 'all' (keydiff): each (layer, KV head)'s importance becomes ranks in [0, 1], the
    ranks are averaged per KV head over the layers ('layers') or over every layer and head ('all'), and the
    kept L entries are the top half of that mean (smoothed over 5 neighbours), the same in every pooled
    (layer, head): recomputed here from the chunk's full keys."""
    prefix, _ = split_template(tiny, "be brief")
    sink = tiny.tokenize(prefix)
    chunk = _distinct_chunk(tiny)
    kw = dict(sink_ids=sink, ratio_high=8, low_type="f32", high_type="f32", compressor="keydiff")
    comp, _ = prefill_chunks(tiny, [chunk], ratio_low=2, pool_scope=scope, **kw)
    full, _ = prefill_chunks(tiny, [chunk], ratio_low=1, **kw)
    L, H, n, S = tiny.info["n_layer"], tiny.info["n_head_kv"], len(chunk), len(sink)
    ranks = np.array([[_ranks(v) for v in per_layer] for per_layer in _keydiff_ref(tiny, full, S, n)])  # [L, H, n]
    pooled = ranks.mean(0, keepdims=True) if scope == "layers" else ranks.mean((0, 1), keepdims=True)
    kept = np.array(comp.low_positions(0)).reshape(L, H, n // 2) - S
    for layer in range(L):
        for h in range(H):
            k = kept[layer, h]
            # the same entries wherever the choice is shared
            np.testing.assert_array_equal(k, kept[0, h] if scope == "layers" else kept[0, 0])
            smooth = _smooth_top(pooled[0, h if scope == "layers" else 0], n // 2)
            dropped = np.setdiff1d(np.arange(n), k)
            assert smooth[k].min() >= smooth[dropped].max() - 1e-6, (layer, h)
    # and not every head's own choice (the pooling changed something)
    own, _ = prefill_chunks(tiny, [chunk], ratio_low=2, **kw)
    assert not np.array_equal(np.array(own.low_positions(0)), np.array(comp.low_positions(0)))


def test_hybrid_sums_snapkv_and_keydiff_ranks(tiny, tiny_hf):
    """compressor='hybrid': per layer and KV head, the rank of snapkv's mean vote (transformers' attention
    probabilities, as in the snapkv test) plus the rank of keydiff's distinctiveness (numpy, from the full
    keys); smoothed over 5 neighbours, the kept L entries are the top half, up to one rank step where the
    votes of two entries tie within float noise."""
    import torch
    import transformers

    prefix, _ = split_template(tiny, "be brief")
    sink = tiny.tokenize(prefix)
    chunk = _distinct_chunk(tiny)
    kw = dict(sink_ids=sink, ratio_high=8, low_type="f32", high_type="f32")
    comp, _ = prefill_chunks(tiny, [chunk], ratio_low=2, compressor="hybrid", **kw)
    full, _ = prefill_chunks(tiny, [chunk], ratio_low=1, compressor="keydiff", **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf[0], dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        att = model(torch.tensor([sink + chunk]), output_attentions=True).attentions
    cfg = model.config
    L, H, group = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    S, n = len(sink), len(chunk)
    distinct = _keydiff_ref(tiny, full, S, n)
    kept = np.array(comp.low_positions(0)).reshape(L, H, n // 2) - S
    overlap = []
    for layer in range(L):
        a = att[layer][0].numpy()  # [n_head, T, T]
        for h in range(H):
            votes = a[h * group:(h + 1) * group, S:, S:].sum((0, 1)) / (n - np.arange(n))
            smooth = _smooth_top(_ranks(votes) + _ranks(distinct[layer, h]), n // 2)
            k = kept[layer, h]
            dropped = np.setdiff1d(np.arange(n), k)
            assert len(np.unique(k)) == n // 2
            assert smooth[k].min() >= smooth[dropped].max() - 1.0 / (n - 1) - 1e-6, (layer, h)
            overlap.append(len(np.intersect1d(k, np.argsort(-smooth, kind="stable")[:n // 2])) / (n // 2))
    assert np.mean(overlap) >= 0.95


def test_compressor_options_are_checked(tiny):
    prefix, _ = split_template(tiny, "be brief")
    chunks = _chunks(tiny, 2)
    with pytest.raises(ValueError, match="compressor"):
        prefill_chunks(tiny, chunks, sink_ids=tiny.tokenize(prefix), compressor="h2o")
    with pytest.raises(ValueError, match="pool_scope"):
        prefill_chunks(tiny, chunks, sink_ids=tiny.tokenize(prefix), pool_scope="layer")
    with pytest.raises(TypeError, match="merge"):
        prefill_chunks(tiny, chunks, sink_ids=tiny.tokenize(prefix), merge=1)
    with pytest.raises(ValueError, match="merge_min_similarity"):
        prefill_chunks(tiny, chunks, sink_ids=tiny.tokenize(prefix), merge=True, merge_min_similarity=1.5)
    with pytest.raises(RuntimeError, match="merge_min_similarity"):  # the C++ check
        _core.X2LPrefill(tiny._s, **{**x2l_edge.X2LOptions().prefill_kwargs(), "merge_min_similarity": -0.5},
                         repeat_prompt=[])
    with pytest.raises(RuntimeError, match="pool_scope"):  # the C++ check, past the Python options
        _core.X2LPrefill(tiny._s, **{**x2l_edge.X2LOptions().prefill_kwargs(), "pool_scope": "x"}, repeat_prompt=[])
    with pytest.raises(RuntimeError, match="vocabulary"):
        prefill_chunks(tiny, chunks, sink_ids=tiny.tokenize(prefix), compressor="kvzip", repeat_prompt=[10 ** 7])
    with pytest.raises(ValueError, match="high_compressor"):
        prefill_chunks(tiny, chunks, sink_ids=tiny.tokenize(prefix), high_compressor="beacon")
    with pytest.raises(RuntimeError, match="two passes"):
        prefill_chunks(tiny, chunks, sink_ids=tiny.tokenize(prefix), high_compressor="keydiff", two_pass=False)
    with pytest.raises(RuntimeError, match="high_compressor"):  # the C++ check, past the Python options
        _core.X2LPrefill(tiny._s, **{**x2l_edge.X2LOptions().prefill_kwargs(), "high_compressor": "h2o"},
                         repeat_prompt=[])


def test_high_compressor_gives_the_h_tier_its_own_rule(tiny, tmp_path):
    """high_compressor: the L tier is what `compressor` alone makes, the H tier what high_compressor alone
    makes (in two passes the H pass sees only the sink and earlier H rows), byte for byte; the index
    records both rules and loads back."""
    chunks = _chunks(tiny, 3)
    kw = dict(ratio_low=2, ratio_high=6, low_type="f32", high_type="f32")
    both = _context(tiny, chunks, compressor="keydiff", high_compressor="snapkv", **kw)
    keydiff_ctx = _context(tiny, chunks, compressor="keydiff", **kw)
    keydiff = keydiff_ctx.index
    snapkv = _context(tiny, chunks, compressor="snapkv", **kw).index
    differ = False
    for c in range(len(chunks)):
        for layer in range(tiny.info["n_layer"]):
            for head in range(tiny.info["n_head_kv"]):
                for value in (False, True):
                    assert both.index.low_rows(c, layer, head, value) == keydiff.low_rows(c, layer, head, value)
                    assert both.index.high_rows(c, layer, head, value) == snapkv.high_rows(c, layer, head, value)
                    differ |= keydiff.high_rows(c, layer, head, value) != snapkv.high_rows(c, layer, head, value)
    assert differ  # the two rules keep different H entries
    assert both.index.settings()["compressor"] == "keydiff/snapkv"
    both.save(tmp_path / "both.x2l")
    loaded = VideoContext.load(tiny, tmp_path / "both.x2l", system="be brief")
    assert loaded.index.settings()["compressor"] == "keydiff/snapkv"
    np.testing.assert_array_equal(loaded.logits("what matters?", [1]), both.logits("what matters?", [1]))
    keydiff_ctx.save(tmp_path / "keydiff.x2l")  # every training-free rule's index loads (not only snapkv's)
    loaded = VideoContext.load(tiny, tmp_path / "keydiff.x2l", system="be brief")
    assert loaded.index.settings()["compressor"] == "keydiff"
    np.testing.assert_array_equal(loaded.logits("what matters?", [2]), keydiff_ctx.logits("what matters?", [2]))


@pytest.mark.parametrize("two_pass,dense", [(True, False), (False, False), (True, True), (False, True)])
def test_uncompressed_x2l_equals_full_forward(tiny, two_pass, dense):
    """Ratio 1 keeps every entry: the chunked prefill + mixed cache must reproduce the plain causal
    forward over sink + chunks + question exactly (positions, causality, segment order, reload). Dense
    positions number an uncompressed tier's entries as the tokens are numbered: the same forward."""
    chunks = _chunks(tiny)
    ctx = _context(tiny, chunks, ratio_low=1, ratio_high=1, low_type="f32", high_type="f32", two_pass=two_pass,
                   dense_positions=dense)
    assert ctx.index.settings()["dense_positions"] == dense
    q = "what does the cache keep?"
    ours_all = ctx.logits(q, range(len(chunks)))
    ours_none = ctx.logits(q, [])
    ref_ids = list(ctx.index.sink_tokens) + [t for c in chunks for t in c] + ctx.question_ids(q)
    tiny.reset()
    ref = tiny.eval(ref_ids, all_logits=True)[-len(ctx.question_ids(q)):]
    np.testing.assert_allclose(ours_all, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_none, ref, rtol=1e-4, atol=1e-4)


def test_question_gap_puts_the_question_after_empty_positions(tiny, tiny_hf):
    """question_gap on a dense index: the question's first token sits question_gap positions after the last
    entry. At ratio 1 that is transformers' own forward over sink + chunks + question with the question's
    position_ids moved by the gap, reloaded or not; an index that keeps token positions ignores it."""
    import torch
    import transformers

    chunks, gap, q = _chunks(tiny), 37, "what does the cache keep?"
    prefix, suffix = split_template(tiny, "be brief")
    kw = dict(sink_ids=tiny.tokenize(prefix), ratio_low=1, ratio_high=1, low_type="f32", high_type="f32")
    dense, _ = prefill_chunks(tiny, chunks, dense_positions=True, **kw)
    ctx = VideoContext(tiny, dense, question_suffix=suffix, question_gap=gap)
    n_cache = len(dense.sink_tokens) + sum(map(len, chunks))
    assert ctx._dec.question_position == n_cache + gap
    q_ids = ctx.question_ids(q)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf[0], dtype=torch.float32,
                                                              attn_implementation="eager")
    ids = list(dense.sink_tokens) + [t for c in chunks for t in c] + q_ids
    pos = list(range(n_cache)) + list(range(n_cache + gap, n_cache + gap + len(q_ids)))
    with torch.no_grad():
        ref = model(torch.tensor([ids]), position_ids=torch.tensor([pos])).logits[0, -len(q_ids):].numpy()
    np.testing.assert_allclose(ctx.logits(q, range(len(chunks))), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ctx.logits(q, []), ref, rtol=1e-4, atol=1e-4)
    no_gap = VideoContext(tiny, dense, question_suffix=suffix).logits(q, [])
    assert np.abs(no_gap - ref).max() > 1e-3  # the gap changed the answer's logits
    # token positions: the question already continues at the next token's position, with or without a gap
    plain, _ = prefill_chunks(tiny, chunks, **kw)
    with_gap = VideoContext(tiny, plain, question_suffix=suffix, question_gap=gap)
    assert with_gap._dec.question_position == n_cache
    np.testing.assert_array_equal(with_gap.logits(q, [1]), VideoContext(tiny, plain, question_suffix=suffix).logits(q, [1]))
    for bad, err in ((-1, ValueError), ((1 << 20) + 1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="question_gap"):
            VideoContext(tiny, dense, question_suffix=suffix, question_gap=bad)
        with pytest.raises(err, match="question_gap"):
            x2l_edge.X2LOptions(question_gap=bad)
    with pytest.raises(x2l_edge.Error, match="question_gap"):  # the C++ layer checks it too
        _core.X2LDecoder(tiny._s, dense, question_gap=-5)


def _rotate(k, delta, theta):
    """NEOX RoPE by delta positions of keys [n, head_dim] (delta: [n])."""
    hd = k.shape[-1]
    ang = np.asarray(delta, np.float64)[:, None] * (theta ** (-np.arange(0, hd, 2) / hd))[None, :]
    x1, x2 = k[:, :hd // 2], k[:, hd // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x1 * np.sin(ang) + x2 * np.cos(ang)], 1)


def test_dense_positions_rotate_kept_rows_to_consecutive_entries(tiny):
    """dense_positions (the official code's numbering): every tier's entries sit at consecutive positions
    after the sink, chunk after chunk, and each kept row is the token's own key turned by the distance
    it moved (recomputed here in numpy from the uncompressed index, per layer and KV head); values do not
    move. Chunk 0 runs at the same positions either way, so its kept tokens are the non-dense index's."""
    prefix, _ = split_template(tiny, "be brief")
    sink = tiny.tokenize(prefix)
    chunks = [_distinct_chunk(tiny), _distinct_chunk(tiny)[::-1]]
    kw = dict(sink_ids=sink, ratio_high=8, low_type="f32", high_type="f32", compressor="keydiff")
    dense, _ = prefill_chunks(tiny, chunks, ratio_low=2, dense_positions=True, **kw)
    plain, _ = prefill_chunks(tiny, chunks, ratio_low=2, **kw)
    full, _ = prefill_chunks(tiny, chunks[:1], ratio_low=1, **kw)
    L, H, hd, n, S = tiny.info["n_layer"], tiny.info["n_head_kv"], tiny.info["head_dim"], len(chunks[0]), len(sink)
    theta = float(tiny._s.metadata("qwen2.rope.freq_base") or 10000.0)
    m_low, m_high = n // 2, n // 8
    assert dense.settings()["dense_positions"] and not plain.settings()["dense_positions"]
    assert dense.low_positions(0) == list(range(S, S + m_low)) * (L * H)
    assert dense.low_positions(1) == list(range(S + m_low, S + 2 * m_low)) * (L * H)
    kept = np.array(plain.low_positions(0)).reshape(L, H, m_low)
    rows = lambda ix, c, layer, h, tier="low", value=False: np.frombuffer(  # noqa: E731
        getattr(ix, tier + "_rows")(c, layer, h, value=value), np.float32).reshape(-1, hd).astype(np.float64)
    for layer in range(L):
        for h in range(H):
            want = _rotate(rows(plain, 0, layer, h), np.arange(S, S + m_low) - kept[layer, h], theta)
            np.testing.assert_allclose(rows(dense, 0, layer, h), want, rtol=1e-5, atol=1e-5)
            assert rows(dense, 0, layer, h, value=True).tobytes() == rows(plain, 0, layer, h, value=True).tobytes()
            # H rows: the tokens the non-dense H level kept (found in the full index), now at S + i
            full_k = rows(full, 0, layer, h)
            tok = [int(np.argmin(np.abs(full_k - r).sum(1))) for r in rows(plain, 0, layer, h, "high")]
            assert len(tok) == m_high and tok == sorted(tok)
            want = _rotate(full_k[tok], np.arange(m_high) - np.array(tok), theta)
            np.testing.assert_allclose(rows(dense, 0, layer, h, "high"), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(rows(dense, 0, 1, 0), rows(plain, 0, 1, 0))  # something moved


def test_dense_mixed_cache_moves_whole_chunks_and_roundtrips(tiny, tmp_path):
    """A dense index's mixed cache: a reloaded chunk's L rows move to follow the H rows before it, and push
    every later chunk back by its extra entries (keys turned by the distance moved, values unchanged),
    the question follows the last
    entry; the index saves and loads with identical answers."""
    chunks = _chunks(tiny, 4)
    ctx = _context(tiny, chunks, ratio_low=2, ratio_high=8, low_type="f32", high_type="f32", dense_positions=True)
    info = tiny.info
    hd = info["head_dim"]
    theta = float(tiny._s.metadata("qwen2.rope.freq_base") or 10000.0)
    extra = CHUNK // 2 - CHUNK // 8  # entries a reloaded chunk adds
    ctx.reload([1])
    assert ctx._dec.cache_entries == len(ctx.index.sink_tokens) + 3 * (CHUNK // 8) + CHUNK // 2
    for c in range(4):
        for head in range(info["n_head_kv"]):
            got = np.frombuffer(ctx._dec.prefix_rows(1 + c, 1, head, False), np.float32).reshape(-1, hd)
            src = (ctx.index.low_rows if c == 1 else ctx.index.high_rows)(c, 1, head)
            k = np.frombuffer(src, np.float32).reshape(-1, hd).astype(np.float64)
            # chunk 1's L rows sit after chunk 0's L rows in the L tier, after its H rows here
            want = _rotate(k, np.full(len(k), {0: 0, 1: -extra}.get(c, extra)), theta)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert ctx._dec.prefix_rows(1 + c, 1, head, True) == (
                ctx.index.low_rows if c == 1 else ctx.index.high_rows)(c, 1, head, value=True)
    q = "what matters?"
    want = {sel: ctx.logits(q, list(sel)) for sel in ((), (1,), (0, 3))}
    assert not np.allclose(want[()], want[(1,)])
    ctx.save(tmp_path / "dense.x2l")
    loaded = VideoContext.load(tiny, tmp_path / "dense.x2l", system="be brief")
    assert loaded.index.settings()["dense_positions"]
    for sel, logits in want.items():
        np.testing.assert_array_equal(loaded.logits(q, list(sel)), logits)


def test_topk0_is_h_only_and_all_is_l_only(tiny):
    """top_k=0 decodes on exactly the H-KVs and top_k=all on exactly the L-KVs: index A (L=2x, H=6x)
    with no chunk reloaded equals index B whose L level is A's H level (6x, same pass, same types)."""
    chunks = _chunks(tiny)
    a = _context(tiny, chunks, ratio_low=2, ratio_high=6, low_type="f16", high_type="f16")
    b = _context(tiny, chunks, ratio_low=6, ratio_high=6, low_type="f16", high_type="f16")
    q = "what is in each scene?"
    np.testing.assert_array_equal(a.logits(q, []), b.logits(q, range(len(chunks))))
    # and with everything reloaded, A runs on its L level, which differs from its H level
    assert not np.allclose(a.logits(q, range(len(chunks))), a.logits(q, []))
    for c in range(len(chunks)):
        for layer in (0, 1):
            assert a.index.high_rows(c, layer, 1) == b.index.low_rows(c, layer, 1)
            assert a.index.high_rows(c, layer, 0, value=True) == b.index.low_rows(c, layer, 0, value=True)


def test_reloaded_rows_are_bit_identical_and_buffers_recycled(tiny):
    chunks = _chunks(tiny, 5)
    ctx = _context(tiny, chunks, ratio_low=2, ratio_high=8)
    for sel in ([1, 3], [0, 2, 4], [4]):
        ctx.reload(sel)
        for c in range(len(chunks)):
            for layer in range(2):
                for head in range(2):
                    for value in (False, True):
                        got = ctx._dec.prefix_rows(1 + c, layer, head, value)
                        want = (ctx.index.low_rows if c in sel else ctx.index.high_rows)(c, layer, head, value)
                        assert got == want
        st = ctx.reload_stats()
        assert st["n_chunks"] == len(sel)
        assert st["bytes"] == sum(ctx.chunk_info(c)["low_bytes"] for c in sel)
    # answers do not depend on what was reloaded before (recycled buffers are fully rewritten)
    q = "what matters?"
    first = ctx.logits(q, [2])
    ctx.logits(q, [0, 1, 3, 4])
    np.testing.assert_array_equal(ctx.logits(q, [2]), first)


def test_memory_accounting_equals_tensor_bytes(tiny):
    chunks = _chunks(tiny)
    ctx = _context(tiny, chunks, ratio_low=2, ratio_high=8, low_type="f16", high_type="q8_0")
    info = tiny.info
    L, H, hd = info["n_layer"], info["n_head_kv"], info["head_dim"]
    row = {"f16": hd * 2, "q8_0": hd // 32 * 34 if hd % 32 == 0 else None, "f32": hd * 4}
    low = high = 0
    for c in range(ctx.n_chunks):
        ci = ctx.chunk_info(c)
        assert ci["low_entries"] == CHUNK // 2 and ci["high_entries"] == CHUNK // 8
        low += ci["low_entries"] * (2 * L * H * row["f16"] + 4)
        high += ci["high_entries"] * (2 * L * H * row[ci["high_type"]] + 4)
    m = ctx.memory()
    assert m["low_bytes"] == low and m["high_bytes"] == high
    assert m["sink_bytes"] == len(ctx.index.sink_tokens) * (2 * L * H * row["f16"] + 4)
    assert m["host_bytes"] == m["low_bytes"] and m["device_bytes"] >= m["high_bytes"] + m["sink_bytes"]


def test_save_load_roundtrip_answers_identically(tiny, tmp_path):
    chunks = _chunks(tiny)
    ctx = _context(tiny, chunks, ratio_low=2, ratio_high=6)
    q = "which tokens matter?"
    want = {tuple(sel): ctx.logits(q, sel) for sel in ([], [1], [0, 3])}
    want_answer = ctx.ask(q, chunks=[1], max_tokens=8)
    path = tmp_path / "video.x2l"
    ctx.save(path)
    loaded = VideoContext.load(tiny, path, system="be brief")
    assert loaded.n_chunks == ctx.n_chunks
    assert not any(loaded.chunk_info(c)["low_mapped"] for c in range(loaded.n_chunks))  # read into memory
    for sel, logits in want.items():
        np.testing.assert_array_equal(loaded.logits(q, list(sel)), logits)
    assert loaded.ask(q, chunks=[1], max_tokens=8) == want_answer
    (tmp_path / "bad.x2l").write_bytes(b"not an index at all" * 10)
    with pytest.raises(x2l_edge.FormatError):
        VideoContext.load(tiny, tmp_path / "bad.x2l")
    raw = path.read_bytes()
    (tmp_path / "old.x2l").write_bytes(b"X2LIDX01" + raw[8:])
    with pytest.raises(x2l_edge.FormatError, match="another x2l-edge version"):
        VideoContext.load(tiny, tmp_path / "old.x2l")
    (tmp_path / "cut.x2l").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(x2l_edge.FormatError, match="truncated"):
        VideoContext.load(tiny, tmp_path / "cut.x2l")


def test_selection_rules(tiny):
    chunks = _chunks(tiny, 5)
    ctx = _context(tiny, chunks, ratio_low=2, ratio_high=8)
    scores = [0.1, 0.9, 0.5, 0.8, 0.2]
    assert ctx.select(scores, top_k=2) == [1, 3]
    assert ctx.select(scores, top_k=0) == []
    assert ctx.select(scores, top_k=1, include_first=True, include_last=True) == [0, 1, 4]
    extra = [ctx.chunk_info(c)["low_bytes"] - ctx.chunk_info(c)["high_bytes"] for c in range(5)]
    assert ctx.select(scores, budget_bytes=extra[1] + extra[3]) == [1, 3]
    assert ctx.select(scores, budget_bytes=extra[1] + extra[3] - 1) == [1, 2] or \
        ctx.select(scores, budget_bytes=extra[1] + extra[3] - 1) == [1]
    with pytest.raises(ValueError):
        ctx.select([1.0, 2.0], top_k=1)
    with pytest.raises(ValueError):  # a chunk index past the last one (docs/api.md)
        ctx.reload([7])
    with pytest.raises(ValueError):
        ctx.scores("q?", scorer="magic")
    # external scores drive the answer
    out = ctx.ask("what matters?", scores=scores, top_k=2, max_tokens=4)
    assert ctx.selected == [1, 3] and isinstance(out, str)


def test_budgets_fail_early(tiny):
    chunks = _chunks(tiny)
    with pytest.raises(x2l_edge.BudgetError, match="max_host_bytes"):
        _context(tiny, chunks, ratio_low=2, ratio_high=8, max_host_bytes=1000)
    with pytest.raises(x2l_edge.BudgetError, match="max_device_bytes"):
        _context(tiny, chunks, ratio_low=2, ratio_high=8, max_device_bytes=1000)
    with pytest.raises(x2l_edge.Error):
        _context(tiny, chunks, ratio_low=8, ratio_high=2)


def test_prefill_text_progress_and_interrupt(tiny):
    text = "the model reads a long video and answers questions. " * 40
    seen = []
    ctx = tiny.prefill_text(text, chunk_tokens=32, progress=lambda step, d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] == ctx.n_chunks and len(seen) == ctx.n_chunks + 1  # (0, n) first
    with pytest.raises(KeyboardInterrupt):
        tiny.prefill_text(text, chunk_tokens=32, progress=lambda step, d, t: d < 2)
    # the session still works after an interrupted prefill
    assert isinstance(tiny.generate("the model", max_tokens=3), str)


def test_single_pass_costs_one_pass(tiny):
    chunks = _chunks(tiny)
    prefix, _ = split_template(tiny, None)
    sink = tiny.tokenize(prefix)
    _, two = prefill_chunks(tiny, chunks, sink_ids=sink, two_pass=True)
    _, one = prefill_chunks(tiny, chunks, sink_ids=sink, two_pass=False)
    n = sum(len(c) for c in chunks)
    assert two["forward_tokens"] == len(sink) + 2 * n
    assert one["forward_tokens"] == len(sink) + n


def test_scorers_rank_planted_chunk(smollm2_path):
    """A chunk containing the question's content, planted among filler chunks, on real weights.

    Every in-model scorer must rank it first at every position, in both prefill modes.
    """
    s = x2l_edge.Session(smollm2_path, n_threads=2, n_ctx=256)
    filler = "The grass is green and the sky is blue. We walked along the road and talked about the weather. "
    planted = "The purple xylophone sang a melody. The purple xylophone sang a melody. "
    question = "What did the purple xylophone sing?"
    for two_pass, positions in ((True, (0, 1, 2, 3, 4)), (False, (1, 3))):
        for pos in positions:
            chunks = [s.tokenize(filler * 3 if i != pos else filler + planted + filler, special=False)[:64]
                      for i in range(5)]
            ctx = _context(s, chunks, ratio_low=2, ratio_high=16, two_pass=two_pass)
            for scorer in ("embedding", "attention", "keys"):
                r = ctx.scores(question, scorer)
                assert r.shape == (5,) and np.isfinite(r).all()
                assert int(np.argmax(r)) == pos, (scorer, two_pass, r)
            if pos == 2:  # an answer prefix is decoded, not scored
                before = ctx.scores(question, "attention")
                ctx.answer_prefix = "The purple xylophone sang"
                assert np.array_equal(ctx.scores(question, "attention"), before)
                assert ctx.question_ids(question)[-len(s.tokenize(" sang")):] == s.tokenize(" sang")
                ctx.answer_prefix = ""



def test_peak_significance_matches_numpy_and_ignores_uniform_excess():
    """The scorers' aggregation against a numpy reference of its formula, and the property it exists
    for: a chunk that draws extra mass from every token (the first chunk does, whatever the question)
    does not outrank the chunk one token singles out."""
    rng = np.random.default_rng(0)
    for n_t, n_content, nc in ((23, 17, 9), (6, 5, 4), (1, 1, 3), (8, 2, 2)):
        mass = rng.dirichlet(np.ones(nc), n_t)
        ref = (mass[:n_content].max(0) - np.median(mass, 0)) / np.sqrt(np.median(mass, 0) + 1e-12)
        np.testing.assert_allclose(_core.peak_significance(np.ascontiguousarray(mass), n_content), ref, rtol=1e-5)
    mass = np.full((20, 6), 0.1)
    mass[:, 0] += 0.3   # every token favours chunk 0
    mass[4, 3] += 0.2   # one question token singles out chunk 3
    s = _core.peak_significance(mass, 15)
    assert int(np.argmax(s)) == 3 and s[0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(_core.Error):
        _core.peak_significance(mass, 0)
    with pytest.raises(_core.Error):
        _core.peak_significance(mass, 21)


def test_snapshot_of_a_prefill_in_progress_is_the_prefix_index(tiny):
    """ChunkedPrefill.snapshot() (a live source asked while it records): a VideoContext over the chunks
    added so far. It must answer exactly as an index prefilled from those chunks alone (the reference),
    for every selection; stay unchanged while chunks are added from another thread and after the
    prefill finishes (its rows are shared, and live as long as the snapshot); and hold the same rows
    as the finished index's first chunks."""
    import gc
    import threading

    from x2l_edge.x2l import ChunkedPrefill

    chunks = _chunks(tiny, 5)
    prefix, suffix = split_template(tiny, "be brief")
    kw = dict(ratio_low=2, ratio_high=6, low_type="f16", high_type="f16")
    run = ChunkedPrefill(tiny, sink_ids=tiny.tokenize(prefix), **kw)
    with pytest.raises(ValueError, match="nothing indexed yet"):
        run.snapshot()
    for c in chunks[:2]:
        run.add(c)
    snap = run.snapshot(question_suffix=suffix)
    ref = _context(tiny, chunks[:2], **kw)  # pin_ends is off: the last-chunk flag changes nothing
    q = "what matters in each scene?"
    sels = ([], [0], [1], [0, 1])
    want = {tuple(s): ref.logits(q, s) for s in sels}
    assert snap.n_chunks == 2 and snap.memory()["low_bytes"] == ref.memory()["low_bytes"]
    for s in sels:
        np.testing.assert_array_equal(snap.logits(q, s), want[tuple(s)])
    assert snap.ask(q, chunks=[1], max_tokens=6) == ref.ask(q, chunks=[1], max_tokens=6)

    # More chunks arrive on another thread while questions are asked on the snapshot.
    errors = []

    def feed():
        try:
            for c in chunks[2:4]:
                run.add(c)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    t = threading.Thread(target=feed)
    t.start()
    while t.is_alive():
        np.testing.assert_array_equal(snap.logits(q, [0, 1]), want[(0, 1)])
    t.join()
    assert not errors and run.n_chunks == 4 and snap.n_chunks == 2
    later = run.snapshot(question_suffix=suffix)
    assert later.n_chunks == 4
    np.testing.assert_array_equal(later.logits(q, [0, 1]), _context(tiny, chunks[:4], **kw).logits(q, [0, 1]))

    run.add(chunks[4], last=True)
    index, stats = run.finish()
    assert index.n_chunks == 5 and stats["input_tokens"] == len(ref.index.sink_tokens) + 5 * CHUNK
    for c in range(2):
        for value in (False, True):
            assert index.low_rows(c, 1, 1, value) == snap.index.low_rows(c, 1, 1, value)
            assert index.high_rows(c, 0, 1, value) == snap.index.high_rows(c, 0, 1, value)
    with pytest.raises(RuntimeError, match="finished"):
        run.snapshot()
    with pytest.raises(RuntimeError, match="finished"):
        run.add(chunks[0])
    # The snapshot outlives the prefill and the finished index (it co-owns the rows).
    del run, index, later
    gc.collect()
    for s in sels:
        np.testing.assert_array_equal(snap.logits(q, s), want[tuple(s)])
