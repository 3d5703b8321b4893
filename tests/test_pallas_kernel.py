"""The Pallas fused expert FFN (impl="pallas"): both kernels in interpret mode on CPU against a
float64 numpy oracle, every-row-written checks, GPU/TPU lowering on CPU, block-size rules."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from readme_jax.errors import ShapeError
from readme_jax.kernels import block_sizes as bsz
from readme_jax.kernels.block_sizes import BlockSizes
from readme_jax.kernels.expert_ffn_pallas import fused_tiles_gpu, fused_tiles_tpu
from readme_jax.kernels.grouping import tile_layout
from readme_jax.ops import expert_ffn

from test_expert_ffn import np_ffn, np_grads, rel_err  # the float64 oracle

SEED = int.from_bytes(os.urandom(4), "little")  # fresh data every run; printed on failure
T_FIX, E_FIX, D, F = 20, 4, 8, 12

# (kernel kw, id): default CPU blocks; tiny blocks so groups span tiles, F spans 3 blocks and the
# GPU kernel's D loops run twice; GPU block rules under the interpreter (exercises padding).
VARIANTS = [
    ({"kernel": "tpu", "interpret": True}, "tpu"),
    ({"kernel": "tpu", "interpret": True, "block_sizes": BlockSizes(tm=4, bf=4)}, "tpu-small"),
    ({"kernel": "gpu", "interpret": True, "block_sizes": BlockSizes(tm=4, bf=4, bk=4, bd=4)}, "gpu-small"),
    ({"backend": "gpu", "interpret": True}, "gpu-rules-padded"),
]
variants = pytest.mark.parametrize("kw", [v for v, _ in VARIANTS], ids=[i for _, i in VARIANTS])
_JIT = {}


def make(rng, ids, dtype=jnp.float32):
    T = len(ids)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return (cast(rng.standard_normal((T, D))), jnp.asarray(ids, jnp.int32),
            cast(rng.standard_normal((E_FIX, D, F)) / np.sqrt(D)),
            cast(rng.standard_normal((E_FIX, D, F)) / np.sqrt(D)),
            cast(rng.standard_normal((E_FIX, F, D)) / np.sqrt(F)))


def ids_from_sizes(rng, sizes, T=T_FIX):
    ids = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)] + [np.full(T - sum(sizes), -1)])
    return rng.permutation(ids.astype(np.int32))


def jitted(kind, kw):
    key = (kind, tuple(sorted(kw.items(), key=str)))
    if key not in _JIT:
        f = lambda x, e, wg, wu, wd: expert_ffn(x, e, wg, wu, wd, impl="pallas", **kw)  # noqa: E731
        if kind == "fwd":
            _JIT[key] = jax.jit(f)
        else:
            _JIT[key] = jax.jit(jax.grad(lambda x, e, wg, wu, wd, gy: jnp.sum(f(x, e, wg, wu, wd) * gy),
                                         argnums=(0, 2, 3, 4)))
    return _JIT[key]


def check(kw, ids, salt, grads=True):
    rng = np.random.default_rng([SEED, salt])
    x, e, wg, wu, wd = make(rng, ids)
    y = jitted("fwd", kw)(x, e, wg, wu, wd)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert rel_err(y, np_ffn(x, ids, wg, wu, wd)) < 1e-5, (SEED, salt, ids)
    if grads:
        gy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        got = jitted("grad", kw)(x, e, wg, wu, wd, gy)
        for name, g, w in zip(("x", "wg", "wu", "wd"), got, np_grads(x, ids, wg, wu, wd, gy)):
            if np.linalg.norm(w) == 0:
                assert np.all(np.asarray(g) == 0), (name, SEED, salt)
            else:
                assert rel_err(g, w) < 1e-5, (name, SEED, salt, ids)


sizes_strategy = st.lists(st.integers(0, 10), min_size=E_FIX, max_size=E_FIX).filter(
    lambda s: sum(s) <= T_FIX)


@variants
@settings(max_examples=8, deadline=None)
@given(sizes=sizes_strategy, salt=st.integers(0, 2**31 - 1))
def test_forward_and_grads_match_numpy(kw, sizes, salt):
    check(kw, ids_from_sizes(np.random.default_rng(salt), sizes), salt, grads=salt % 2 == 0)


@variants
@pytest.mark.parametrize("sizes", [[T_FIX, 0, 0, 0], [0, 0, 0, T_FIX], [0] * E_FIX, [0, 1, 0, 0]],
                         ids=["all-first", "all-last", "all-dropped", "one"])
def test_edge_group_sizes(kw, sizes):
    check(kw, ids_from_sizes(np.random.default_rng(SEED), sizes), 3)


@variants
def test_single_token(kw):
    for k in range(E_FIX):
        check(kw, np.array([k], np.int32), k, grads=k == 1)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("T", [1, 24])
def test_bf16(kernel, T):
    rng = np.random.default_rng([SEED, T])
    ids = rng.integers(0, E_FIX, T).astype(np.int32)
    x, e, wg, wu, wd = make(rng, ids, jnp.bfloat16)
    y = expert_ffn(x, e, wg, wu, wd, impl="pallas", kernel=kernel, interpret=True)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, np_ffn(x, ids, wg, wu, wd)) < 1e-2, SEED


def _layout_inputs(rng, tm):
    ids = np.array([2, 0, 2, 2, -1, 2, 0, 3, 2], np.int32)  # empty group 1, a dropped token
    x, e, wg, wu, wd = make(rng, ids)
    m = tile_layout(e, E_FIX, tm)
    x_PD = jnp.take(x, m.row_src_P, axis=0, mode="fill", fill_value=0)
    want = np_ffn(np.asarray(x_PD), np.asarray(m.tile_expert_N).repeat(tm), wg, wu, wd)
    used_rows = np.arange(len(m.row_src_P)) < int(m.num_tiles) * tm
    assert not used_rows.all(), "layout should have unused tiles"
    return m, x_PD, wg, wu, wd, want, used_rows


def test_tpu_kernel_writes_every_row():
    """Output aliased to a NaN buffer: every row (padding, unused tiles) must be overwritten."""
    rng = np.random.default_rng(SEED)
    tm = 2
    m, x_PD, wg, wu, wd, want, used = _layout_inputs(rng, tm)
    poison = jnp.full(x_PD.shape, jnp.nan, jnp.float32)
    y = np.asarray(fused_tiles_tpu(x_PD, m.tile_expert_N, m.num_tiles, m.tile_rows_N, wg, wu, wd, tm=tm, bf=4,
                                   interpret=True, out_init=poison))
    assert not np.isnan(y).any()
    assert np.all(y[~used] == 0) and np.all(y[np.asarray(m.row_src_P) == 9] == 0)
    assert rel_err(y[used], want[used]) < 1e-5, SEED


def test_gpu_kernel_adds_exactly_the_ffn():
    """The GPU kernel accumulates atomically into its (aliased) buffer: start from random values
    and check it added the FFN to used rows and nothing anywhere else."""
    rng = np.random.default_rng(SEED)
    tm = 2
    m, x_PD, wg, wu, wd, want, used = _layout_inputs(rng, tm)
    base = jnp.asarray(rng.standard_normal(x_PD.shape), jnp.float32)
    y = np.asarray(fused_tiles_gpu(x_PD, m.tile_expert_N, m.num_tiles, m.tile_rows_N, wg, wu, wd, tm=tm, bf=4,
                                   bk=4, bd=4, interpret=True, out_init=base))
    np.testing.assert_array_equal(y[~used], np.asarray(base)[~used])
    assert rel_err(y[used] - np.asarray(base)[used], want[used]) < 1e-5, SEED


def _garbage_padding(rng, m, x_PD):
    """x_PD with NaN and huge values in its padding rows (row_src_P == T): a kernel that reads
    or adds padding rows shows it in the output."""
    pad = np.asarray(m.row_src_P) == len(m.pos_T)
    x = np.asarray(x_PD).copy()
    x[pad] = 1e4 * rng.standard_normal(x[pad].shape)
    x[pad, 0] = np.nan
    return jnp.asarray(x), pad


def test_tpu_kernel_masks_padding_rows():
    """Ragged tails (groups of 5 and 1 rows in tiles of 2) and an empty expert: padding rows hold
    garbage, yet they come out as exact zeros and the real rows equal the FFN."""
    rng = np.random.default_rng([SEED, 11])
    tm = 2
    m, x_PD, wg, wu, wd, want, used = _layout_inputs(rng, tm)
    x_bad, pad = _garbage_padding(rng, m, x_PD)
    assert (pad & used).sum() == 2  # two padding rows inside used tiles
    poison = jnp.full(x_PD.shape, jnp.nan, jnp.float32)
    y = np.asarray(fused_tiles_tpu(x_bad, m.tile_expert_N, m.num_tiles, m.tile_rows_N, wg, wu, wd,
                                   tm=tm, bf=4, interpret=True, out_init=poison))
    assert np.all(y[pad] == 0)
    assert rel_err(y[~pad], want[~pad]) < 1e-5, SEED


def test_gpu_kernel_leaves_padding_rows_untouched():
    """The GPU kernel neither reads padding rows of x nor adds into padding rows of its
    accumulator: those rows of the aliased buffer come back bit for bit as they went in."""
    rng = np.random.default_rng([SEED, 12])
    tm = 2
    m, x_PD, wg, wu, wd, want, used = _layout_inputs(rng, tm)
    x_bad, pad = _garbage_padding(rng, m, x_PD)
    base = np.asarray(rng.standard_normal(x_PD.shape), np.float32)
    y = np.asarray(fused_tiles_gpu(x_bad, m.tile_expert_N, m.num_tiles, m.tile_rows_N, wg, wu, wd,
                                   tm=tm, bf=4, bk=4, bd=4, interpret=True, out_init=jnp.asarray(base)))
    np.testing.assert_array_equal(y[pad], base[pad])
    assert rel_err(y[~pad] - base[~pad], want[~pad]) < 1e-5, SEED


def _kernel_eqns(jaxpr, name):
    """Every ``name`` equation anywhere inside ``jaxpr`` (sub-jaxprs included)."""
    out = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == name:
                out.append(eqn)
            for v in eqn.params.values():
                for sub in v if isinstance(v, (list, tuple)) else (v,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return out


def test_compiled_gpu_kernel_uses_masked_atomics():
    """The compiled (non-interpret) GPU kernel adds with masked atomics (the interpreter runs the
    equivalent masked read-modify-write, tested above); cross-lowering to Triton checks they lower."""
    rng = np.random.default_rng(SEED)
    m, x_PD, wg, wu, wd, _, _ = _layout_inputs(rng, 2)
    jaxpr = jax.make_jaxpr(lambda x: fused_tiles_gpu(x, m.tile_expert_N, m.num_tiles, m.tile_rows_N, wg, wu,
                                                     wd, tm=2, bf=4, bk=4, bd=4, interpret=False))(x_PD)
    atomics = _kernel_eqns(jaxpr, "atomic_rmw")
    assert atomics
    for eqn in atomics:
        _, _, _, mask = eqn.params["args_tree"].unflatten(eqn.invars)
        assert mask is not None


@pytest.mark.parametrize("backend, platform, call", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                     ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("shape", [(1, 576, 768), (256, 576, 768), (8, 4096, 5504)],
                         ids=["smollm-decode", "smollm-256", "llama7b-decode"])
def test_lowers_for_accelerators(backend, platform, call, shape):
    """Cross-lower on CPU: Pallas->Triton / Mosaic lowering accepts our blocks (pow2 shapes,
    (8,128) tiling, scalar prefetch), forward and backward. Compiling to PTX / running on the
    device is not covered here."""
    T, Dm, Fm = shape
    bf16 = jnp.bfloat16
    x, e = jax.ShapeDtypeStruct((T, Dm), bf16), jax.ShapeDtypeStruct((T,), jnp.int32)
    wg, wd = jax.ShapeDtypeStruct((8, Dm, Fm), bf16), jax.ShapeDtypeStruct((8, Fm, Dm), bf16)

    def loss(x, e, wg, wu, wd):
        y = expert_ffn(x, e, wg, wu, wd, impl="pallas", backend=backend, interpret=False)
        return jnp.sum(y.astype(jnp.float32))

    for f in (loss, jax.grad(loss, argnums=(0, 2, 3, 4))):
        text = jax.jit(f).trace(x, e, wg, wg, wd).lower(lowering_platforms=(platform,)).as_text()
        assert call in set(re.findall(r"custom_call @([\w$.]+)", text))


@pytest.mark.parametrize("backend", ["gpu", "tpu", "cpu"])
@pytest.mark.parametrize("T, E, Dm, Fm", [(1, 8, 576, 768), (8, 7, 576, 768), (128, 8, 576, 768),
                                          (4096, 8, 4096, 5504), (32, 2, 4096, 5504),
                                          (5, 3, 8, 12), (100, 4, 200, 300)])
def test_block_size_rules(backend, T, E, Dm, Fm):
    bs = bsz.choose(backend, T, E, Dm, Fm, 2)
    kernel = "gpu" if backend == "gpu" else "tpu"
    bsz.validate(bs, kernel, Dm, Fm)
    Fp, Dp = bs.f_pad or Fm, bs.d_pad or Dm
    assert Fp % bs.bf == 0 and bs.tm >= bsz.TABLE[backend]["tm_min"]
    if backend == "gpu":
        for b in (bs.tm, bs.bf, bs.bk, bs.bd):
            assert b >= 16 and b & (b - 1) == 0, bs  # Triton: power-of-two blocks, tl.dot >= 16
        assert Dp % bs.bk == 0 and Dp % bs.bd == 0
    if backend == "tpu":
        assert bs.bf % 128 == 0 or bs.bf == Fp, bs
        assert bsz.tpu_vmem_bytes(bs.tm, Dm, bs.bf, 2) <= bsz.TPU_VMEM_BUDGET
    if (Dm, Fm) in ((576, 768), (4096, 5504)):
        assert bs.f_pad == 0 and bs.d_pad == 0  # real checkpoints need no padding


def test_bad_pallas_options_raise():
    rng = np.random.default_rng(SEED)
    x, e, wg, wu, wd = make(rng, np.array([0, 1, 2], np.int32))
    with pytest.raises(ShapeError, match=r"bf=5 does not divide F=12"):
        expert_ffn(x, e, wg, wu, wd, impl="pallas", kernel="tpu", block_sizes=BlockSizes(tm=4, bf=5))
    with pytest.raises(ShapeError, match=r"bk=3 does not divide D=8"):
        expert_ffn(x, e, wg, wu, wd, impl="pallas", kernel="gpu",
                   block_sizes=BlockSizes(tm=4, bf=4, bk=3, bd=4))
    with pytest.raises(ShapeError, match=r"backend must be one of .* got 'metal'"):
        expert_ffn(x, e, wg, wu, wd, impl="pallas", backend="metal")
    with pytest.raises(ShapeError, match=r"kernel must be one of .* got 'cuda'"):
        expert_ffn(x, e, wg, wu, wd, impl="pallas", kernel="cuda")
    with pytest.raises(ShapeError, match=r"expert id 4 is out of range \[0, 4\)"):
        expert_ffn(x, e.at[1].set(4), wg, wu, wd, impl="pallas")


ON_DEVICE = jax.default_backend() in ("gpu", "tpu")


@pytest.mark.skipif(not ON_DEVICE, reason="compiled kernel needs a GPU or TPU")
@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 1e-2), (jnp.float32, 1e-5)])
@pytest.mark.parametrize("T, unique", [(1, 1), (8, 2), (128, 7), (300, 8)])
def test_compiled_kernel_on_device(dtype, tol, T, unique):
    """The real (non-interpret) kernel for this device at SmolLM2 expert shapes, fwd and grads."""
    Dm, Fm, E = 576, 768, 8
    rng = np.random.default_rng([SEED, T])
    ids = rng.permutation(np.resize(rng.choice(E, unique, replace=False), T)).astype(np.int32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    x = cast(rng.standard_normal((T, Dm)))
    wg, wu = (cast(rng.standard_normal((E, Dm, Fm)) / np.sqrt(Dm)) for _ in range(2))
    wd = cast(rng.standard_normal((E, Fm, Dm)) / np.sqrt(Fm))
    e = jnp.asarray(ids)
    y = jax.jit(lambda *a: expert_ffn(*a, impl="pallas"))(x, e, wg, wu, wd)
    assert rel_err(y, np_ffn(x, ids, wg, wu, wd)) < tol, SEED
    gy = cast(rng.standard_normal((T, Dm)))

    def grads(impl):
        loss = lambda x, wg, wu, wd: jnp.sum((expert_ffn(x, e, wg, wu, wd, impl=impl) * gy).astype(jnp.float32))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, wg, wu, wd)

    for g, w in zip(grads("pallas"), grads("xla")):
        assert rel_err(g, np.asarray(w, np.float64)) < tol, SEED


# --------------------------------------------------------------------------- precision by dtype


def _kernel_dots(jaxpr):
    """(precision, preferred_element_type) of every dot_general inside the pallas_call kernels."""
    found, in_kernel = [], []

    def walk(jx, inside):
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general" and inside:
                found.append((eqn.params["precision"], eqn.params["preferred_element_type"]))
            sub_inside = inside or eqn.primitive.name == "pallas_call"
            in_kernel.append(eqn.primitive.name == "pallas_call")
            for v in eqn.params.values():
                for sub in v if isinstance(v, (list, tuple)) else (v,):
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub, sub_inside)

    walk(jaxpr.jaxpr, False)
    assert any(in_kernel), "no pallas_call found"
    return found


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_precision_by_dtype(kernel, dtype):
    """bf16/f16 operands: DEFAULT precision (native tensor-core/MXU rate); f32: HIGHEST (Triton
    would use TF32 otherwise); every dot accumulates in f32."""
    rng = np.random.default_rng(SEED)
    args = make(rng, np.array([0, 1, 1, 3], np.int32), dtype)
    bs = BlockSizes(tm=4, bf=4, bk=4, bd=4)
    jaxpr = jax.make_jaxpr(lambda *a: expert_ffn(*a, impl="pallas", kernel=kernel, interpret=True,
                                                 block_sizes=bs))(*args)
    dots = _kernel_dots(jaxpr)
    assert len(dots) == 3  # gate, up, down
    HIGHEST = jax.lax.Precision.HIGHEST
    for precision, acc in dots:
        assert acc == jnp.float32
        if dtype == jnp.float32:
            assert precision == (HIGHEST, HIGHEST), precision
        else:
            assert precision is None or HIGHEST not in precision, precision


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 1e-2), (jnp.float16, 2e-3), (jnp.float32, 1e-5)])
def test_each_dtype_against_f32_reference(kernel, dtype, tol):
    """The kernel in bf16/f16/f32 against the f32 XLA reference on the same (rounded) inputs: the
    16-bit tolerances allow the rounding of the hidden and the output to the input dtype."""
    rng = np.random.default_rng([SEED, 7])
    ids = rng.integers(0, E_FIX, 24).astype(np.int32)
    x, e, wg, wu, wd = make(rng, ids, dtype)
    y = expert_ffn(x, e, wg, wu, wd, impl="pallas", kernel=kernel, interpret=True,
                   block_sizes=BlockSizes(tm=8, bf=4, bk=4, bd=4))
    assert y.dtype == dtype
    f32 = [a.astype(jnp.float32) for a in (x, wg, wu, wd)]
    want = expert_ffn(f32[0], e, *f32[1:], impl="reference")
    assert rel_err(y, np.asarray(want, np.float64)) < tol, (SEED, dtype)
