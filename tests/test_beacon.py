"""Beacon (Video-XL VST) compression against an independent PyTorch reference of Video-XL's
chunked beacon prefill and bi-level decoding (../shared/X2L_SPEC.md §1.2, §2.2, §3.2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import x2l_edge
from x2l_edge.x2l import VideoContext, prefill_chunks

LOW, HIGH = 2, 4


class RefVideoXL:
    """Video-XL's LLM from the checkpoint's state dict: keys cached pre-RoPE, RoPE re-applied to the
    whole cache with dense positions at every step, VST rows through beacon_{q,k,v}_proj."""

    def __init__(self, hf_dir):
        from safetensors.torch import load_file

        self.sd = load_file(str(hf_dir / "model.safetensors"))
        cfg = json.loads((hf_dir / "config.json").read_text())
        self.L = cfg["num_hidden_layers"]
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg["num_key_value_heads"]
        self.hd = cfg["hidden_size"] // self.nh
        self.eps = cfg["rms_norm_eps"]
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        self.inv = 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd))

    def w(self, name):
        return self.sd[name].double()

    def embed(self, ids):
        return self.w("model.embed_tokens.weight")[ids]

    def rope(self, x, pos):  # x [n, heads, hd], NEOX rotate_half
        ang = pos[:, None].double() * self.inv[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        half = self.hd // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def norm(self, x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * w

    def forward(self, x, vst, mem):
        """x [n, E] inputs; vst [n] bool; mem: per layer (K_pre [m, nkv, hd], V) -> (new K_pre, V per layer, h)."""
        n = x.shape[0]
        out_kv = []
        for l in range(self.L):
            p = f"model.layers.{l}."
            h = self.norm(x, self.w(p + "input_layernorm.weight"))
            proj = {}
            for k in "qkv":
                a = h @ self.w(p + f"self_attn.{k}_proj.weight").T + self.w(p + f"self_attn.{k}_proj.bias")
                b = h @ self.w(p + f"self_attn.beacon_{k}_proj.weight").T + self.w(p + f"self_attn.beacon_{k}_proj.bias")
                proj[k] = torch.where(vst[:, None], b, a)
            q = proj["q"].view(n, self.nh, self.hd)
            k = proj["k"].view(n, self.nkv, self.hd)
            v = proj["v"].view(n, self.nkv, self.hd)
            K = torch.cat([mem[l][0], k]) if mem else k
            V = torch.cat([mem[l][1], v]) if mem else v
            out_kv.append((k, v))
            total = K.shape[0]
            pos = torch.arange(total)
            Kr = self.rope(K, pos)
            qr = self.rope(q, pos[total - n:])
            g = self.nh // self.nkv
            Kr, Vr = Kr.repeat_interleave(g, 1), V.repeat_interleave(g, 1)
            s = torch.einsum("nhd,mhd->hnm", qr, Kr) / self.hd ** 0.5
            mask = torch.ones(n, total, dtype=torch.bool).tril(total - n)
            s = s.masked_fill(~mask, float("-inf"))
            o = torch.einsum("hnm,mhd->nhd", s.softmax(-1), Vr).reshape(n, -1)
            x = x + o @ self.w(p + "self_attn.o_proj.weight").T
            h = self.norm(x, self.w(p + "post_attention_layernorm.weight"))
            gate = h @ self.w(p + "mlp.gate_proj.weight").T
            up = h @ self.w(p + "mlp.up_proj.weight").T
            x = x + (torch.nn.functional.silu(gate) * up) @ self.w(p + "mlp.down_proj.weight").T
        return out_kv, x

    def logits(self, h):
        return self.norm(h, self.w("model.norm.weight")) @ self.w("lm_head.weight").T

    def prefill(self, sink_ids, chunks):
        """Two passes (ratio LOW then HIGH), chunk i on top of the sink and the same level's VSTs."""
        e = self.embed(torch.tensor(sink_ids))
        sink, _ = self.forward(e, torch.zeros(len(sink_ids), dtype=torch.bool), None)
        vst_e = self.w("model.beacon_embed_tokens.weight")[0]
        levels = {}
        for a in (LOW, HIGH):
            mem = [(k.clone(), v.clone()) for k, v in sink]
            per_chunk = []
            for ids in chunks:
                rows, flags = [], []
                for t, tok in enumerate(ids):
                    rows.append(self.embed(torch.tensor(tok)))
                    flags.append(False)
                    if (t + 1) % a == 0:
                        rows.append(vst_e)
                        flags.append(True)
                flags = torch.tensor(flags)
                kv, _ = self.forward(torch.stack(rows), flags, mem)
                keep = [(k[flags], v[flags]) for k, v in kv]
                per_chunk.append(keep)
                mem = [(torch.cat([m[0], c[0]]), torch.cat([m[1], c[1]])) for m, c in zip(mem, keep)]
            levels[a] = per_chunk
        return sink, levels

    def answer_logits(self, sink, levels, selected, q_ids):
        mem = [(k, v) for k, v in sink]
        for c in range(len(levels[LOW])):
            part = levels[LOW if c in selected else HIGH][c]
            mem = [(torch.cat([m[0], p[0]]), torch.cat([m[1], p[1]])) for m, p in zip(mem, part)]
        _, h = self.forward(self.embed(torch.tensor(q_ids)), torch.zeros(len(q_ids), dtype=torch.bool), mem)
        return self.logits(h).numpy()


@pytest.fixture(scope="module")
def videoxl(tmp_path_factory):
    import convert
    import tiny_models

    d = tmp_path_factory.mktemp("videoxl")
    hf = tiny_models.make_tiny_videoxl(d / "hf", seed=4)
    path = d / "m.gguf"
    convert.convert(str(hf), str(path), "f32", progress=False)
    return hf, str(path)


def test_beacon_prefill_and_mixed_decode_match_reference(videoxl):
    hf, path = videoxl
    s = x2l_edge.Session(path, n_threads=2, kv_type="f32", n_ctx=512)
    ref = RefVideoXL(hf)
    ids = s.tokenize("the model reads a long video and answers questions about every scene in it " * 3,
                     special=False)
    chunks = [ids[i:i + 12] for i in range(0, 48, 12)]
    sink_ids = s.tokenize("<|im_start|>user\n")
    index, stats = prefill_chunks(s, chunks, sink_ids=sink_ids, ratio_low=LOW, ratio_high=HIGH, low_type="f32",
                                  high_type="f32", compressor="beacon")
    ctx = VideoContext(s, index, question_suffix="<|im_end|>\n<|im_start|>assistant\n")
    assert index.settings()["dense_positions"]
    assert [ctx.chunk_info(c)["low_entries"] for c in range(4)] == [12 // LOW] * 4
    assert [ctx.chunk_info(c)["high_entries"] for c in range(4)] == [12 // HIGH] * 4
    # two passes over the interleaved chunks: raw + VST rows of both levels, plus the sink
    assert stats["forward_tokens"] == len(sink_ids) + 4 * (12 + 12 // LOW) + 4 * (12 + 12 // HIGH)

    sink, levels = ref.prefill(sink_ids, chunks)
    q = ctx.question_ids("what happens?")
    for sel in ([], [0, 1, 2, 3], [1], [0, 2]):
        want = ref.answer_logits(sink, levels, sel, q)
        got = ctx.logits("what happens?", sel)
        err = np.abs(got - want).max() / want.std()
        assert err < 1e-4, (sel, err)


def test_beacon_needs_vst_weights(tiny_gguf):
    s = x2l_edge.Session(tiny_gguf("qwen2", "f32"), n_threads=1)
    with pytest.raises(x2l_edge.Error, match="beacon"):
        prefill_chunks(s, [[1, 2, 3, 4]], sink_ids=[5], compressor="beacon", high_type="f16")
