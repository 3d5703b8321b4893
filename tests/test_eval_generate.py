"""Perplexity reduction, greedy generation through the cache, and the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.config import tiny_model_config
from readme_jax.eval.perplexity import mean_nll, nll_fn_for, per_block_nll
from readme_jax.model import decoder
from readme_jax.model.llama import Llama
from readme_jax.model.sampling import sample


def test_mean_nll_matches_numpy_log_softmax():
    cfg = tiny_model_config()
    model = Llama(cfg, rngs=nnx.Rngs(int(np.random.randint(1 << 30))))
    blocks = np.random.randint(0, cfg.vocab_size, (5, 9)).astype(np.int32)
    got = mean_nll(nll_fn_for(model.arrays(), cfg), blocks, batch_size=2)
    ref = _numpy_token_nll(model.arrays(), cfg, blocks).mean()
    assert abs(got - ref) < 1e-5 * max(1.0, abs(ref))


def test_per_block_nll_matches_numpy_and_averages_to_mean_nll():
    cfg = tiny_model_config()
    model = Llama(cfg, rngs=nnx.Rngs(int(np.random.randint(1 << 30))))
    blocks = np.random.randint(0, cfg.vocab_size, (5, 9)).astype(np.int32)
    fn = nll_fn_for(model.arrays(), cfg)
    got = per_block_nll(fn, blocks, batch_size=2)  # batches 2, 2, 1: a short last batch too
    ref = _numpy_token_nll(model.arrays(), cfg, blocks).mean(-1)
    assert got.shape == (5,) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    T = blocks.shape[1] - 1
    assert abs(np.sum(got * T) / (5 * T) - mean_nll(fn, blocks, batch_size=2)) < 1e-9


def _numpy_token_nll(params, cfg, blocks):
    """Float64 log-softmax NLL ``[N, T]`` of the logits the decoder gives for ``blocks[:, :-1]``."""
    logits = np.asarray(decoder.forward(params, cfg, jnp.asarray(blocks[:, :-1]))[0], np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, blocks[:, 1:, None], -1)[..., 0]


def test_sampler_greedy_and_nucleus():
    rng = np.random.default_rng()
    logits = jnp.asarray(rng.standard_normal((4, 11)) * 3, jnp.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    g = sample(logits, key, jnp.zeros(4), jnp.ones(4))
    assert (g == jnp.argmax(logits, -1)).all()
    # tiny top_p keeps only the most likely token
    t = sample(logits, key, jnp.ones(4), jnp.full(4, 1e-6))
    assert (t == jnp.argmax(logits, -1)).all()


def test_sampler_distribution_and_nucleus_exclusion():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keys = jax.random.split(jax.random.key(int(np.random.randint(1 << 30))), 4000)
    draw = jax.vmap(lambda k: sample(logits, k, jnp.ones(1), jnp.ones(1))[0])(keys)
    freq = np.bincount(np.asarray(draw), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.035)
    # top_p = 0.7: mass before token 2 is 0.8 >= 0.7 -> tokens 2 and 3 excluded
    draw = jax.vmap(lambda k: sample(logits, k, jnp.ones(1), jnp.full(1, 0.7))[0])(keys)
    freq = np.bincount(np.asarray(draw), minlength=4) / 4000
    assert freq[2] == 0 and freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.035)


def test_sampler_top_k_keeps_the_k_most_likely():
    logits = jnp.log(jnp.asarray([[0.05, 0.3, 0.15, 0.5]], jnp.float32))
    keys = jax.random.split(jax.random.key(int(np.random.randint(1 << 30))), 4000)
    draw = jax.vmap(lambda k: sample(logits, k, jnp.ones(1), jnp.ones(1), jnp.full(1, 2))[0])(keys)
    freq = np.bincount(np.asarray(draw), minlength=4) / 4000
    assert freq[0] == 0 and freq[2] == 0
    np.testing.assert_allclose(freq[[3, 1]], [0.5 / 0.8, 0.3 / 0.8], atol=0.035)
    one = jax.vmap(lambda k: sample(logits, k, jnp.ones(1), jnp.ones(1), jnp.full(1, 1))[0])(keys)
    assert (np.asarray(one) == 3).all()
    # top_k 0 = no limit: the very same draws as without top_k
    a = jax.vmap(lambda k: sample(logits, k, jnp.ones(1), jnp.ones(1), jnp.zeros(1, jnp.int32))[0])(keys)
    b = jax.vmap(lambda k: sample(logits, k, jnp.ones(1), jnp.ones(1))[0])(keys)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
