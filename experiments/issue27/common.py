"""Shared helpers for issue-27 experiments (exploratory; see README.md here)."""
import os, sys, time, json, math, functools
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import numpy as np, jax, jax.numpy as jnp
from readme_jax.config import loading, RunConfig
from readme_jax.workflow.workspace import Workspace
from readme_jax.model import decoder, layers
from readme_jax.eval.perplexity import dense_block_nll, per_block_nll
from readme_jax.eval.routing import fixed_route_block_nll

def workspace(out="/tmp/runs/exp", overrides=()):
    cfg = loading.load(RunConfig, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../configs/smollm2_135m_quick.yaml"), [f"output_dir={out}", *overrides])
    return Workspace(cfg, progress=False)

def _gram_ffn(lp, h, mask):
    hid = layers.ffn_hidden(h, lp["wg"], lp["wu"]).astype(jnp.float32)
    y = jnp.dot(hid, lp["wd"].astype(jnp.float32)).astype(h.dtype)
    hm = hid * mask[..., None]
    B, T, F = hid.shape
    G = jnp.einsum("nf,ng->fg", hm.reshape(-1, F), hid.reshape(-1, F))
    s = jnp.abs(hm).sum((0, 1))
    return y, (G, s)

@functools.partial(jax.jit, static_argnames=("cfg",))
def gram_step(params, toks, mask, cfg):
    _, _, (G, s) = decoder.forward(params, cfg, toks, ffn=_gram_ffn, ffn_ctx=mask, logits=False)
    return G, s

def domain_grams(ws, dense, cfg, n=8, T=512, bs=2, cache="/tmp/exp_gram"):
    os.makedirs(cache, exist_ok=True)
    out = {}
    for d in ws.domains:
        p = f"{cache}/{d}_{n}_{T}.npz"
        if os.path.exists(p):
            z = np.load(p); out[d] = (z["G"], z["s"], int(z["n"])); continue
        blocks = ws.blocks(d, "train", T, n, sampling="spread")[:, :-1]
        G = np.zeros((cfg.n_layers, cfg.ffn_dim, cfg.ffn_dim), np.float64); s = 0; cnt = 0
        for i in range(0, len(blocks), bs):
            b = blocks[i:i+bs]
            g, ss = gram_step(dense, jnp.asarray(b), jnp.ones(b.shape, jnp.float32), cfg)
            G += np.asarray(g, np.float64); s = s + np.asarray(ss, np.float64); cnt += b.size
        np.savez(p, G=G.astype(np.float32), s=s, n=cnt)
        out[d] = (G.astype(np.float32), s, cnt)
        print("gram", d, cnt, flush=True)
    return out
