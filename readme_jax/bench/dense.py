"""Dense-model speed, ours vs Hugging Face transformers on the same weights, in one run.

    python -m readme_jax.bench.dense [--model embedded] [--prefill 512] [--steps 32] [--json out.json]

Reports prefill tokens/s (one sequence of ``--prefill`` tokens) and greedy decode ms/step at
batch 1 and 8 (after a prompt of 32 tokens), median of ``--repeats`` timed runs after a warm-up,
for readme-jax (jitted, KV cache, donated buffers) and transformers (torch, ``use_cache=True``),
and the ratio. transformers loads the same GGUF file (needs torch, transformers, accelerate).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.checkpoints import embedded_gguf_path, load_model
from readme_jax.config import ModelConfig
from readme_jax.model import decoder


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _step(params, cfg: ModelConfig, tokens_BT, positions_BT, cache):
    """One greedy step through the KV cache (the cache buffers donated): next token ids and the cache."""
    logits, cache, _ = decoder.forward(params, cfg, tokens_BT, positions_BT, cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compiles)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def ours(model, tokens: np.ndarray, batches=(1, 8), steps=32, repeats=3) -> dict:
    params, cfg = model.arrays(), model.cfg
    T = tokens.shape[0]

    @jax.jit
    def prefill(p, tok):
        return decoder.forward(p, cfg, tok)[0][:, -1].argmax(-1)

    tok = jnp.asarray(tokens[None])
    out = {"prefill_tok_s": T / _median_time(lambda: prefill(params, tok).block_until_ready(), repeats)}
    P = 32
    for B in batches:
        prompt = jnp.asarray(np.repeat(tokens[None, :P], B, 0))

        def run():
            cache = decoder.init_cache(cfg, B, P + steps + 1)
            nxt, cache = _step(params, cfg, prompt, jnp.broadcast_to(jnp.arange(P), (B, P)), cache)
            nxt.block_until_ready()
            t0 = time.perf_counter()
            for i in range(steps):
                nxt, cache = _step(params, cfg, nxt[:, None], jnp.full((B, 1), P + i, jnp.int32), cache)
            nxt.block_until_ready()
            return (time.perf_counter() - t0) / steps

        run()
        out[f"decode_ms_b{B}"] = 1e3 * statistics.median(run() for _ in range(repeats))
    return out


def transformers_ref(gguf_path, tokens: np.ndarray, batches=(1, 8), steps=32, repeats=3) -> dict:
    # local import: torch/transformers are test extras, not runtime dependencies
    import torch
    # local import: torch/transformers are test extras, not runtime dependencies
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    m = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                             torch_dtype=torch.float32).eval()
    T = tokens.shape[0]
    tok = torch.as_tensor(tokens[None], dtype=torch.long)
    with torch.no_grad():
        out = {"prefill_tok_s": T / _median_time(lambda: m(tok, use_cache=False).logits[:, -1].argmax(-1), repeats)}
        P = 32
        for B in batches:
            prompt = torch.as_tensor(np.repeat(tokens[None, :P], B, 0), dtype=torch.long)

            def run():
                o = m(prompt, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(steps):
                    o = m(nxt[:, None], past_key_values=past, use_cache=True)
                    past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1)
                return (time.perf_counter() - t0) / steps

            run()
            out[f"decode_ms_b{B}"] = 1e3 * statistics.median(run() for _ in range(repeats))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="'embedded' or a .gguf path (transformers reads it too)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    path = embedded_gguf_path() if a.model == "embedded" else __import__("pathlib").Path(a.model)
    model, tok = load_model(path)
    text = open(__import__("pydoc_data.topics", fromlist=["x"]).__file__).read()
    ids = np.asarray(tok.encode(text)[: a.prefill], np.int32)
    r_ours = ours(model, ids, steps=a.steps, repeats=a.repeats)
    r_ref = transformers_ref(path, ids, steps=a.steps, repeats=a.repeats)
    res = {"machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}",
           "date": time.strftime("%Y-%m-%d"), "model": str(path), "readme_jax": r_ours, "transformers": r_ref}
    print(f"{'metric':<18}{'readme-jax':>12}{'transformers':>14}{'ratio':>8}")
    for k in r_ours:
        better = r_ours[k] / r_ref[k] if k.endswith("tok_s") else r_ref[k] / r_ours[k]
        print(f"{k:<18}{r_ours[k]:>12.2f}{r_ref[k]:>14.2f}{better:>7.2f}x")
    print("(ratio > 1: readme-jax faster)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
