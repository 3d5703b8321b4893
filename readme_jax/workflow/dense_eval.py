"""Stage `dense_eval` (also `readme-jax eval-dense`): per-domain perplexity of the dense model on
held-out text and a greedy completion of a prompt."""

from __future__ import annotations

import time

from readme_jax.eval.perplexity import dense_block_nll, domain_ppl
from readme_jax.jsonfile import write_json
from readme_jax.model.readme_model import DenseModel
from readme_jax.serve.engine import complete
from readme_jax.workflow.workspace import Workspace


def run_dense_eval(ws: Workspace) -> dict:
    t0 = time.time()
    model, tok = ws.dense
    e = ws.cfg.eval
    blocks = ws.eval_blocks()
    nll = dense_block_nll(model.arrays(), model.cfg, blocks, e.batch_size, ws.progress, "dense")
    ppl = domain_ppl(nll)
    ids = tok.encode(e.prompt)
    new = complete(DenseModel.from_module(model), ids, e.max_new_tokens, eos_id=tok.eos_id)
    out = {"ppl": ppl, "nll_blocks": {d: v.tolist() for d, v in nll.items()},
           "prompt": e.prompt, "completion": tok.decode(new),
           "eval": {"split": e.split, "seq_len": e.seq_len, "blocks_per_domain": {d: int(len(b)) for d, b in blocks.items()}},
           "model": ws.cfg.model}
    write_json(ws.stage_dir("dense_eval") / "dense_eval.json", out)
    ws.mark_done("dense_eval", out, time.time() - t0)
    for d, p in ppl.items():
        ws.log(f"  dense ppl {d:12s} {p:8.2f}")
    ws.log(f"  {e.prompt!r} -> {out['completion']!r}")
    return out
