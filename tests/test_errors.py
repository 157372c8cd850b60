"""The error contract (docs/api.md, issue 24 defects 10-12): the exception types the README promises,
arguments checked before they reach the native layer (no signature dumps, no silent coercion),
questions longer than n_batch scored in batches."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest

import x2l_edge
from x2l_edge import BudgetError, X2LOptions
from x2l_edge.x2l import VideoContext

TEXT = "the keeper wrote about the wind, the ships, the colour of the sea and the birds. " * 12


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("qwen2", "f32")


@pytest.fixture(scope="module")
def session(model):
    return x2l_edge.Session(model, n_threads=1, n_ctx=256, kv_type="f32")


@pytest.fixture(scope="module")
def ctx(session):
    return session.prefill_text(TEXT, chunk_tokens=24, ratio_low=2, ratio_high=6)


def test_files(tmp_path, session, ctx):
    for open_ in (x2l_edge.Session, x2l_edge.GGUFFile.open, lambda p: VideoContext.load(session, p)):
        with pytest.raises(FileNotFoundError):
            open_(str(tmp_path / "missing"))
        with pytest.raises(IsADirectoryError):
            open_(str(tmp_path))
    with pytest.raises(IsADirectoryError):
        ctx.save(tmp_path)
    with pytest.raises(FileNotFoundError):
        ctx.save(tmp_path / "no" / "such" / "dir.x2l")
    assert os.listdir(tmp_path) == []  # nothing half-written left behind


def test_session_arguments(model):
    with pytest.raises(BudgetError, match="2\\^31 positions"):
        x2l_edge.Session(model, n_ctx=10**12)
    with pytest.raises(BudgetError, match="machine's memory"):
        x2l_edge.Session(model, n_ctx=2**31 - 1, kv_type="f32")
    for kw, exc in [(dict(n_ctx=1.5), TypeError), (dict(n_ctx=-1), ValueError), (dict(n_batch=0), ValueError),
                    (dict(n_batch=2.0), TypeError), (dict(n_threads=1000), ValueError),
                    (dict(n_threads=True), TypeError), (dict(kv_type=3), TypeError)]:
        with pytest.raises(exc):
            x2l_edge.Session(model, **kw)
    with pytest.warns(RuntimeWarning, match="training context"):
        x2l_edge.Session(model, n_threads=1, n_ctx=512)  # the tiny model was trained on 256 positions
    cores = os.cpu_count() or 1
    with pytest.warns(RuntimeWarning, match="more than the"):
        s = x2l_edge.Session(model, n_threads=cores + 1, n_ctx=64)
    assert s.info["n_threads"] == cores + 1


@pytest.mark.parametrize("kw, exc", [
    (dict(top_k=1.7), TypeError), (dict(top_k=-5), ValueError), (dict(top_k=2**31), ValueError),
    (dict(seed=-1), ValueError), (dict(seed=2**64), ValueError), (dict(seed=1.5), TypeError),
    (dict(temperature=math.inf), ValueError), (dict(temperature=math.nan), ValueError),
    (dict(temperature=-0.5), ValueError), (dict(top_p=0.0), ValueError), (dict(top_p=1.5), ValueError),
    (dict(min_p=2.0), ValueError), (dict(repeat_penalty=0.0), ValueError), (dict(repeat_last_n=-1), ValueError),
    (dict(max_tokens=1.5), TypeError), (dict(max_tokens=True), TypeError), (dict(max_tokens=-1), ValueError),
])
def test_sampling_arguments(session, kw, exc):
    with pytest.raises(exc):
        session.generate("the keeper", **{"max_tokens": 2, **kw})
    with pytest.raises(exc):
        session.generate("the keeper", stream=True, **{"max_tokens": 2, **kw})


def test_prompt_and_token_arguments(session):
    with pytest.raises(TypeError):
        session.generate(None)
    with pytest.raises(TypeError):
        session.generate([1.5, 2])
    with pytest.raises(ValueError):
        session.generate([10**9])
    with pytest.raises(ValueError):
        session.eval([-1])
    with pytest.raises(TypeError):
        session.detokenize([2.5])
    # and the session is untouched by the refused calls
    assert session.generate("the keeper", max_tokens=3) == session.generate("the keeper", max_tokens=3)


def test_video_context_arguments(ctx):
    with pytest.raises(TypeError):
        ctx.ask("what did he write?", top_k=1.7, max_tokens=2)
    with pytest.raises(ValueError):
        ctx.ask("what did he write?", top_k=-5, max_tokens=2)
    with pytest.raises(TypeError):
        ctx.reload([1.9])
    with pytest.raises(ValueError):
        ctx.reload([ctx.n_chunks])
    with pytest.raises(ValueError):
        ctx.select([math.nan] * ctx.n_chunks)
    with pytest.raises(ValueError):
        ctx.select(question="what?", budget_bytes=-1)


@pytest.mark.parametrize("kw, exc", [
    (dict(max_host_bytes=-1), ValueError), (dict(ratio_low=1.5), TypeError), (dict(ratio_low=0), ValueError),
    (dict(pin_ends=1), TypeError), (dict(low_type=8), TypeError), (dict(top_k=2.0), TypeError),
    (dict(prefill_low_cache_bytes=-2), ValueError), (dict(no_such_option=1), TypeError),
    (dict(pool_scope="token"), ValueError), (dict(pool_scope=1), TypeError), (dict(merge="yes"), TypeError),
])
def test_x2l_options(kw, exc):
    with pytest.raises(exc):
        X2LOptions().replace(**kw)


def test_long_questions_are_scored_in_batches(model):
    """A question longer than n_batch: the attention, keys and high scorers run it n_batch rows at a time
    and score exactly as one forward over the whole question does."""
    question = "which birds rested on the gallery and what colour was the sea " * 5
    scores = {}
    for n_batch in (16, 512):
        s = x2l_edge.Session(model, n_threads=1, n_ctx=256, kv_type="f32", n_batch=n_batch)
        c = s.prefill_text(TEXT, chunk_tokens=24, ratio_low=2, ratio_high=6)
        assert len(c.question_ids(question)) > 16
        for scorer in ("attention", "keys", "high"):
            scores[scorer, n_batch] = c.scores(question, scorer)
    for scorer in ("attention", "keys", "high"):
        assert np.all(np.isfinite(scores[scorer, 16]))
        np.testing.assert_allclose(scores[scorer, 16], scores[scorer, 512], rtol=1e-5, atol=1e-6)
