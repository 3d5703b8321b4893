"""Tuning after the one-shot refit: loss kinds x lr, oracle routes, N steps x 4 x 256."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *
from readme_jax.convert import experts as ex
from readme_jax.data import mixture_batches
from readme_jax.model.moe import routed_ffn
from readme_jax.train import steps, schedule
from readme_jax.config import StageConfig

R, SF, LAM = 0.6, 0.75, 1e-4
KIND = sys.argv[1]; LR = float(sys.argv[2]); NSTEPS = int(sys.argv[3]); WHO = sys.argv[4] if len(sys.argv) > 4 else "moe"
NB = 8
ws = workspace()
model, tok = ws.dense
cfg = model.cfg
dense = jax.tree.map(jnp.asarray, model.arrays())
grams = domain_grams(ws, dense, cfg)
doms = ws.domains; E = len(doms)
Gm = np.stack([grams[d][0] / grams[d][2] for d in doms]).astype(np.float64)
wd = np.asarray(dense["layers"]["wd"], np.float64)
sc = np.einsum("nlff->nlf", Gm) * (wd ** 2).sum(-1)[None]
masks = ex.select_channels(sc, R, sc.mean(0), SF)
from readme_jax.convert.refit import refit_down_projections
import pickle
cal = [ws.blocks(d, "train", 512, 8, sampling="spread")[:, :-1] for d in doms]
cache = f"/tmp/exp_refit_{WHO}.pkl"
if WHO == "moe":
    moe, meta = ex.moe_arrays_from_dense(jax.device_get(dense), masks, domains=doms, r=R, layout="split")
    if not os.path.exists(cache):
        got = refit_down_projections(dense, cfg, cal, meta["shared_index"], meta["channel_index"], ridge=LAM)
        pickle.dump(got, open(cache, "wb"))
    got = pickle.load(open(cache, "rb"))
    moe["layers"]["shared_wd"] = got["shared_wd"]; moe["layers"]["wd"] = got["wd"]
    params = jax.tree.map(jnp.asarray, moe); pcfg = cfg
    ffn = routed_ffn("xla"); ctx_fn = lambda p, x: p
else:
    fe = ex.expert_width(cfg.ffn_dim, R)
    pruned, pcfg = ex.pruned_dense_arrays(jax.device_get(dense), sc.mean(0), fe, cfg)
    pidx = ex._sorted_index(ex.top_channels(sc.mean(0), fe), fe)
    if not os.path.exists(cache):
        got = refit_down_projections(dense, cfg, cal, pidx, None, ridge=LAM)
        pickle.dump(got, open(cache, "wb"))
    got = pickle.load(open(cache, "rb"))
    pruned["layers"]["wd"] = got["shared_wd"]
    params = jax.tree.map(jnp.asarray, pruned)
    ffn = decoder.dense_ffn; ctx_fn = None
blocks = {d: ws.blocks(d, "test", 256, NB, sampling="spread") for d in doms}
dn = dense_block_nll(dense, cfg, blocks, 4, False, "dense")
def evaluate(p):
    if WHO == "moe":
        nm = {d: fixed_route_block_nll(p, cfg, "xla", blocks[d], i, 4) for i, d in enumerate(doms)}
    else:
        nm = dense_block_nll(p, pcfg, blocks, 4, False, "p")
    r = {d: float(np.exp(np.mean(nm[d]) - np.mean(dn[d]))) for d in nm}
    return float(np.exp(np.mean(np.log(list(r.values()))))), r
spec = steps.LM_ONLY if KIND == "lm" else steps.LossSpec(kind=KIND, teacher_cfg=cfg)
st = StageConfig(steps=NSTEPS, batch_size=4, lr=LR, seq_len=256)
tx = schedule.make_optimizer(st, 0.01, 1.0)
step = steps.make_lm_step(pcfg, ffn, ctx_fn, tx, loss=spec)
tr, fr = steps.split_params(params, steps.frozen_keys(False))
opt = tx.init(tr)
ds = mixture_batches(doms, tok, seq_len=256, batch_size=4, split="train", seed=123, sep_id=ws.sep_id, progress=False)
g0, r0 = evaluate(params) if os.environ.get("EVAL0") else (float("nan"), {})
print("before tuning", g0, r0, flush=True)
t0 = time.time()
for i in range(NSTEPS):
    b = ds[i]; toks = np.asarray(b["tokens"], np.int32)
    route = np.broadcast_to(np.asarray(b["domain"])[:, None], (4, 256)).astype(np.int32)
    tr, opt, m = step(tr, fr, opt, jnp.asarray(route) if WHO == "moe" else None, jnp.asarray(toks), schedule.lr_at(st, 0, 1.0, i),
                      dense if spec.uses_teacher else None)
    if i % 8 == 0: print(i, {k: round(float(v), 3) for k, v in m.items()}, flush=True)
dt = time.time() - t0
g, r = evaluate(steps.merge_params(tr, fr))
print(f"TUNE who={WHO} kind={KIND} lr={LR} steps={NSTEPS} ({dt:.0f}s): geomean {g:.3f} | " + " ".join(f"{d[:4]} {r[d]:.2f}" for d in doms), flush=True)
