"""Teacher NLL of the chat expert vs expert width r (untuned, refit), and of q1's trained model."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *
import json
from readme_jax.convert import experts as ex
from readme_jax.convert.calibrate import load_stats
from readme_jax.convert.refit import refit_down_projections
from readme_jax.eval.chat import answer_nll
from readme_jax.eval.chat_prompts import chat_prompts
from readme_jax.workflow.training import load_trained
from readme_jax.model.moe import routed_ffn

ws = workspace("/tmp/runs/q1")
model, tok = ws.dense
cfg = model.cfg
dense = model.arrays()
stats = load_stats("/tmp/runs/q1/refactor/stats.npz")
doms = list(stats.domains)
E = len(doms); CHAT = doms.index("chat")
ans = json.load(open("/tmp/runs/q1/chat_eval/answers.json"))["answers"]
prompts = chat_prompts()
ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True), add_bos=False) for p in prompts]
dans = [tok.encode(r["dense"], add_bos=False) + [tok.eos_id] for r in ans]

@functools.partial(jax.jit, static_argnames=("cfg",))
def forced(params, toks, *, cfg, e):
    route = jnp.full(toks.shape, e, jnp.int32)
    return decoder.forward(params, cfg, toks, ffn=routed_ffn("xla"), ffn_ctx=route)[0]

@functools.partial(jax.jit, static_argnames=("cfg",))
def dense_logits(params, toks, *, cfg):
    return decoder.forward(params, cfg, toks)[0]

print("dense", answer_nll(functools.partial(dense_logits, dense, cfg=cfg), ids, dans), flush=True)
tr = load_trained(ws)
print("q1 trained routed", answer_nll(jax.jit(lambda t: tr(t).logits), ids, dans), flush=True)
print("q1 trained forced chat", answer_nll(functools.partial(forced, tr.backbone_params, cfg=cfg, e=CHAT), ids, dans), flush=True)
cc = ws.cfg.convert
batches = [ws.blocks(d, "train", 512, 8, sampling="spread")[:, :-1] for d in doms]
for r in [float(x) for x in sys.argv[1].split(",")]:
    scores, pooled = ex.channel_scores(stats, dense["layers"]["wd"], "output")
    masks = ex.select_channels(scores, r, pooled, 0.75)
    moe, meta = ex.moe_arrays_from_dense(dense, masks, domains=doms, r=r, layout="split")
    got = refit_down_projections(dense, cfg, batches, meta["shared_index"], meta["channel_index"], ridge=1e-4)
    moe["layers"].update(got)
    moe = jax.tree.map(jnp.asarray, moe)
    active = (cfg.d_model * 1536 + 3 * cfg.d_model * meta["expert_width"]) / (cfg.d_model * 1536 + 3 * cfg.d_model * 1536)
    print(f"r={r} chat expert untuned (refit): teacher NLL", answer_nll(functools.partial(forced, moe, cfg=cfg, e=CHAT), ids, dans), flush=True)
