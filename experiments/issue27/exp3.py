"""Sequential (layer by layer) least-squares refit of the down projections, oracle routing."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *
from readme_jax.convert import experts as ex

R = float(sys.argv[1]); SF = float(sys.argv[2]); TARGET = sys.argv[3]; LAM = float(sys.argv[4])
NCAL = int(sys.argv[5]) if len(sys.argv) > 5 else 8
NB = 8
ws = workspace()
model, tok = ws.dense
cfg = model.cfg
dense = jax.tree.map(jnp.asarray, model.arrays())
grams = domain_grams(ws, dense, cfg)
doms = ws.domains
E = len(doms)
Gm = np.stack([grams[d][0] / grams[d][2] for d in doms]).astype(np.float64)
wd = np.asarray(dense["layers"]["wd"], np.float64)
wdn = (wd ** 2).sum(-1)
sc = np.einsum("nlff->nlf", Gm) * wdn[None]
masks = ex.select_channels(sc, R, sc.mean(0), SF)
moe, meta = ex.moe_arrays_from_dense(jax.device_get(dense), masks, domains=doms, r=R, layout="split")
fe = meta["expert_width"]
pidx = ex._sorted_index(ex.top_channels(sc.mean(0), fe), fe)
pruned, pcfg = ex.pruned_dense_arrays(jax.device_get(dense), sc.mean(0), fe, cfg)

T = 512
cal = {d: ws.blocks(d, "train", T, NCAL, sampling="spread")[:, :-1] for d in doms}
pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (NCAL, T))
cos, sin = layers.rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_llama3)

@jax.jit
def attn_part(x, lp):
    B, T_, D = x.shape; H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = layers.rms_norm(x, lp["attn_norm"], cfg.norm_eps)
    q = layers.apply_rope((h @ lp["wq"]).reshape(B, T_, H, hd), cos, sin)
    k = layers.apply_rope((h @ lp["wk"]).reshape(B, T_, K, hd), cos, sin)
    v = (h @ lp["wv"]).reshape(B, T_, K, hd)
    a = layers.attend(q, k, v, pos, pos, cfg.attn_scale)
    x = x + a @ lp["wo"]
    return x, layers.rms_norm(x, lp["ffn_norm"], cfg.norm_eps)

@jax.jit
def hidden(h, wg, wu):
    return layers.ffn_hidden(h, wg, wu).astype(jnp.float32)

@jax.jit
def gram(hid):
    hh = hid.reshape(-1, hid.shape[-1])
    return hh.T @ hh

def lyr(l):
    return {k: v[l] for k, v in dense["layers"].items()}

def run(kind):
    """kind: moe | pruned. Returns new wd arrays."""
    xs = {d: dense["embed"][jnp.asarray(cal[d])] for d in doms}   # pruned stream
    xd = dict(xs)                                                   # dense stream
    L = cfg.n_layers
    if kind == "moe":
        sidx, cidx = meta["shared_index"], meta["channel_index"]
        swd = np.array(moe["layers"]["shared_wd"], np.float64); ewd = np.array(moe["layers"]["wd"], np.float64)
    else:
        pwd = np.array(pruned["layers"]["wd"], np.float64)
    for l in range(L):
        lp = lyr(l)
        A = None
        if kind == "moe":
            s0 = sidx[l][sidx[l] >= 0]; se = [cidx[l, e][cidx[l, e] >= 0] for e in range(E)]
            sizes = [len(s0)] + [len(x) for x in se]; off = np.cumsum([0] + sizes); n0 = len(s0)
            A = np.zeros((off[-1], off[-1])); Bm = np.zeros((off[-1], cfg.d_model))
        else:
            S = pidx[l]; A = np.zeros((len(S), len(S))); Bm = np.zeros((len(S), cfg.d_model))
        post = {}
        for e, d in enumerate(doms):
            x1, h = attn_part(xs[d], lp)
            hid = hidden(h, lp["wg"], lp["wu"])
            n = hid.shape[0] * hid.shape[1]
            if TARGET == "local":
                Y = np.asarray(hid.reshape(-1, hid.shape[-1]) @ lp["wd"], np.float64)
            else:
                xd1, hd_ = attn_part(xd[d], lp)
                xd[d] = xd1 + layers.swiglu(hd_, lp["wg"], lp["wu"], lp["wd"])
                Y = np.asarray((xd[d] - x1).reshape(-1, cfg.d_model), np.float64)
            G = np.asarray(gram(hid), np.float64) / n
            H = np.asarray(hid.reshape(-1, hid.shape[-1]), np.float64)
            if kind == "moe":
                idx = np.concatenate([s0, se[e]]); sub = G[np.ix_(idx, idx)]; rhs = H[:, idx].T @ Y / n
                b0, b1 = slice(off[0], off[1]), slice(off[e+1], off[e+2])
                A[b0, b0] += sub[:n0, :n0]; A[b0, b1] += sub[:n0, n0:]; A[b1, b0] += sub[n0:, :n0]; A[b1, b1] += sub[n0:, n0:]
                Bm[b0] += rhs[:n0]; Bm[b1] += rhs[n0:]
            else:
                A += G[np.ix_(S, S)]; Bm += H[:, S].T @ Y / n
            post[d] = (x1, hid)
        W = np.linalg.solve(A + LAM * np.mean(np.diag(A)) * np.eye(len(A)), Bm)
        for e, d in enumerate(doms):
            x1, hid = post[d]
            if kind == "moe":
                idx = np.concatenate([s0, se[e]]); w = np.concatenate([W[:n0], W[off[e+1]:off[e+2]]])
            else:
                idx = S; w = W
            y = jnp.asarray(np.asarray(hid.reshape(-1, hid.shape[-1]))[:, idx] @ w, jnp.float32).reshape(x1.shape)
            xs[d] = x1 + y
        if kind == "moe":
            swd[l, :n0] = W[:n0]
            for e in range(E): ewd[l, e, :len(se[e])] = W[off[e+1]:off[e+2]]
        else:
            pwd[l] = W
    if kind == "moe":
        out = dict(moe); out["layers"] = dict(moe["layers"]); out["layers"]["shared_wd"] = jnp.asarray(swd, jnp.float32)
        out["layers"]["wd"] = jnp.asarray(ewd, jnp.float32); return out
    out = dict(pruned); out["layers"] = dict(pruned["layers"]); out["layers"]["wd"] = jnp.asarray(pwd, jnp.float32); return out

blocks = {d: ws.blocks(d, "test", 256, NB, sampling="spread") for d in doms}
dn = dense_block_nll(dense, cfg, blocks, 4, False, "dense")
def ratio(nll):
    r = {d: float(np.exp(np.mean(nll[d]) - np.mean(dn[d]))) for d in nll}
    return float(np.exp(np.mean(np.log(list(r.values()))))), r
t0 = time.time(); m = run("moe"); t1 = time.time(); p = run("pruned"); t2 = time.time()
nm = {d: fixed_route_block_nll(m, cfg, "xla", blocks[d], i, 4) for i, d in enumerate(doms)}
npr = dense_block_nll(p, pcfg, blocks, 4, False, "p")
g1, r1 = ratio(nm); g2, r2 = ratio(npr)
print(f"SEQ r={R} sf={SF} target={TARGET} lam={LAM} ncal={NCAL} ({t1-t0:.0f}s/{t2-t1:.0f}s): moe_oracle {g1:.3f} pruned {g2:.3f} | "
      + " ".join(f"{d[:4]} {r1[d]:.2f}/{r2[d]:.2f}" for d in doms), flush=True)
