"""Calibration-side variants at r~0.6, oracle routing, no training."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *
from readme_jax.convert import experts as ex

R = float(sys.argv[1]) if len(sys.argv) > 1 else 0.6
SF = float(sys.argv[2]) if len(sys.argv) > 2 else 0.75
NB = 8
LAMS = [float(x) for x in sys.argv[4].split(',')] if len(sys.argv) > 4 else [1e-3]
ws = workspace()
model, tok = ws.dense
cfg = model.cfg
dense = model.arrays()
grams = domain_grams(ws, dense, cfg)
doms = ws.domains
Gm = np.stack([grams[d][0] / grams[d][2] for d in doms]).astype(np.float64)   # [N,L,F,F] mean gram
act = np.stack([grams[d][1] / grams[d][2] for d in doms])                    # [N,L,F] mean |h|
wd = np.asarray(dense["layers"]["wd"], np.float64)                            # [L,F,D]
wdn = (wd ** 2).sum(-1)                                                       # [L,F]
diagG = np.einsum("nlff->nlf", Gm)
scores = {"act": act, "out": diagG * wdn[None]}
def obs_score():
    out = np.zeros_like(act)
    for n in range(Gm.shape[0]):
        for l in range(Gm.shape[1]):
            G = Gm[n, l]; inv = np.linalg.inv(G + 1e-3 * np.mean(np.diag(G)) * np.eye(len(G)))
            out[n, l] = wdn[l] / np.diag(inv)
    return out
if "obs" in sys.argv[3]: scores["obs"] = obs_score()
blocks = {d: ws.blocks(d, "test", 256, NB, sampling="spread") for d in doms}
dn = dense_block_nll(dense, cfg, blocks, 4, False, "dense")
dense_ppl = {d: float(np.exp(np.mean(v))) for d, v in dn.items()}
print("dense", {d: round(p, 2) for d, p in dense_ppl.items()}, flush=True)

def ratio(nll):
    r = {d: float(np.exp(np.mean(nll[d]) - np.mean(dn[d]))) for d in nll}
    return float(np.exp(np.mean(np.log(list(r.values()))))), r

def refit_moe(params, meta, lam):
    lp = params["layers"]
    sidx, cidx = meta["shared_index"], meta["channel_index"]
    L, E = cidx.shape[0], cidx.shape[1]
    swd = np.array(lp["shared_wd"], np.float64); ewd = np.array(lp["wd"], np.float64)
    for l in range(L):
        s0 = sidx[l][sidx[l] >= 0]
        se = [cidx[l, e][cidx[l, e] >= 0] for e in range(E)]
        sizes = [len(s0)] + [len(x) for x in se]
        off = np.cumsum([0] + sizes)
        A = np.zeros((off[-1], off[-1])); B = np.zeros((off[-1], wd.shape[-1]))
        for e in range(E):
            G = Gm[e, l]
            idx = np.concatenate([s0, se[e]])
            blk = [slice(off[0], off[1]), slice(off[e+1], off[e+2])]
            sub = G[np.ix_(idx, idx)]
            rhs = G[idx] @ wd[l]
            n0 = len(s0)
            A[blk[0], blk[0]] += sub[:n0, :n0]; A[blk[0], blk[1]] += sub[:n0, n0:]
            A[blk[1], blk[0]] += sub[n0:, :n0]; A[blk[1], blk[1]] += sub[n0:, n0:]
            B[blk[0]] += rhs[:n0]; B[blk[1]] += rhs[n0:]
        reg = lam * np.mean(np.diag(A))
        W = np.linalg.solve(A + reg * np.eye(len(A)), B)
        swd[l, :len(s0)] = W[:len(s0)]
        for e in range(E):
            ewd[l, e, :len(se[e])] = W[off[e+1]:off[e+2]]
    out = dict(params); out["layers"] = dict(lp)
    out["layers"]["shared_wd"] = jnp.asarray(swd, jnp.float32); out["layers"]["wd"] = jnp.asarray(ewd, jnp.float32)
    return out

def refit_pruned(params, idx, lam):
    Gp = Gm.mean(0)
    pwd = np.array(params["layers"]["wd"], np.float64)
    for l in range(idx.shape[0]):
        S = idx[l]
        A = Gp[l][np.ix_(S, S)]; B = Gp[l][S] @ wd[l]
        pwd[l] = np.linalg.solve(A + lam * np.mean(np.diag(A)) * np.eye(len(S)), B)
    out = dict(params); out["layers"] = dict(params["layers"]); out["layers"]["wd"] = jnp.asarray(pwd, jnp.float32)
    return out

res = {}
for sname in sys.argv[3].split(",") if len(sys.argv) > 3 else ["act", "out"]:
    sc = scores[sname]
    masks = ex.select_channels(sc, R, sc.mean(0), SF)
    moe, meta = ex.moe_arrays_from_dense(dense, masks, domains=doms, r=R, layout="split")
    moe = jax.tree.map(jnp.asarray, moe)
    pooled = sc.mean(0)
    fe = meta["expert_width"]
    pruned, pcfg = ex.pruned_dense_arrays(dense, pooled, fe, cfg)
    pidx = ex._sorted_index(ex.top_channels(pooled, fe), fe)
    for lam in LAMS:
        m = moe if lam is None else refit_moe(moe, meta, lam)
        p = pruned if lam is None else refit_pruned(pruned, pidx, lam)
        nm = {d: fixed_route_block_nll(m, cfg, "xla", blocks[d], i, 4) for i, d in enumerate(doms)}
        npr = dense_block_nll(p, pcfg, blocks, 4, False, "p")
        g1, r1 = ratio(nm); g2, r2 = ratio(npr)
        print(f"r={R} sf={SF} score={sname} refit={lam}: moe_oracle geomean {g1:.3f} pruned {g2:.3f} | "
              + " ".join(f"{d[:4]} {r1[d]:.2f}/{r2[d]:.2f}" for d in doms), flush=True)
