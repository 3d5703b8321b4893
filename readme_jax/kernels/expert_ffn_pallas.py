"""Pallas fused gathered-expert FFN: ``expert_ffn(..., impl="pallas")``.

Tokens are laid out sorted by expert with every group padded to a multiple of the row tile
``tm`` (``kernels.grouping.tile_layout``), so each tile holds ONE expert's tokens and a tile that
straddles two groups cannot occur. Per tile, one kernel computes gate and up projections with
that expert's weights, ``silu(gate) * up`` and the down projection, looping over F in blocks of
``bf`` and accumulating the down projection in float32; the [T, F] hidden never goes to memory.
Empty groups get no tile; tiles past the used count (``num_tiles``, data-dependent) do no work.

Two kernels, one per lowering:

- ``"tpu"`` (Mosaic): grid ``(N tiles, F/bf)``, F innermost and sequential ("arbitrary"); the
  tile's expert id comes from scalar prefetch (``PrefetchScalarGridSpec``) into the weight
  BlockSpecs' index maps, so the pipeline DMAs exactly the blocks of that expert; a [tm, D] f32
  VMEM accumulator is written to the output at the last F block (every output row written;
  padding rows of a tile -- past its group's end, from ``tile_rows_N`` in scalar prefetch -- and
  unused tiles as exact zeros). Unused tiles map to the last used weight block: nothing fetched.
- ``"gpu"`` (Triton): grid ``(N tiles, F/bf)``, every program independent. Program (n, f) reads
  the expert id, computes the [tm, bf] hidden slice (gate/up contracted over D in ``bk`` chunks)
  and atomically adds its [tm, D] down-projection partial (in ``bd`` chunks) into a zeroed f32
  output. Loads of x and the atomic adds are masked to the tile's real rows (``tile_rows_N``):
  padding rows are neither read nor added to (decode, 2 tokens per expert, tm=16: 14 of every
  tile's 16 rows). Decode batches (1-3 experts, a tile each) still spread over ``N * F/bf``
  programs, so all SMs stream weights. Float32 atomics make the summation order (not the math)
  vary by run.

Matmuls accumulate in f32; precision follows the operand dtype (``dot_precision``).

On CPU either kernel runs with ``interpret=True`` (the default there: the TPU-style kernel;
interpret is the default wherever the kernel does not match the device).
The backward (``custom_vjp``) is the XLA tile loop of ``kernels.xla_tiles`` on the same layout.

Inside ``jax.shard_map`` the kernels' operands and ``out_shape`` carry the inputs' manual mesh
axes (``kernels.vma``); interpreted there, the TPU-style kernel runs under the Mosaic TPU
interpreter and the GPU kernel is refused (``_shard_map_interpreter`` says why).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from readme_jax.errors import ShapeError
from readme_jax.kernels import block_sizes as bsz
from readme_jax.kernels import grouping
from readme_jax.kernels.vma import out_struct, union_axes, vary_all
from readme_jax.kernels.xla_tiles import compute_dtype, tiled_ffn_bwd

F32 = jnp.float32
KERNELS = ("tpu", "gpu")


def _silu(g):
    return g / (1.0 + jnp.exp(-g))


def dot_precision(dtype) -> jax.lax.Precision:
    """Matmul precision for operands of ``dtype``; every dot accumulates in f32 regardless.

    - bf16 / f16: ``DEFAULT``: the tensor cores / MXU take these natively, and f32 accumulation
      comes from ``preferred_element_type``; a higher precision buys nothing and may cost passes.
    - f32 (and f64, interpret only): ``HIGHEST``, because both accelerator lowerings need it to
      match an f32 reference: Pallas->Triton lowers ``DEFAULT`` on f32 operands to TF32 (10-bit
      mantissa; ``HIGHEST`` gives IEEE f32), and Pallas->Mosaic emits no contract precision for
      ``DEFAULT`` (``HIGHEST`` gives ``#tpu.contract_precision<fp32>``), leaving f32 matmuls to
      Mosaic's default, which may use fewer bf16 MXU passes, as XLA:TPU's ``DEFAULT`` does (not
      checked on a TPU here). On CPU (interpret mode) precision changes nothing.
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else jax.lax.Precision.DEFAULT


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=F32, precision=dot_precision(a.dtype))


# --------------------------------------------------------------------------- TPU (Mosaic)


def _real_rows(tile_rows_ref, n, tm: int, width: int):
    """[tm, width] mask of tile n's real rows (padding rows of its group, and every row of an
    unused tile, are False)."""
    row = jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
    return row < tile_rows_ref[n]


def _tpu_kernel(te_ref, nt_ref, tr_ref, x_ref, wg_ref, wu_ref, wd_ref, *rest):
    y_ref, acc_ref = rest[-2], rest[-1]  # rest = ([aliased out_init ref,] y_ref, acc_ref)
    n, f = pl.program_id(0), pl.program_id(1)
    nf = pl.num_programs(1)

    @pl.when(f == 0)
    def _zero():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(n < nt_ref[0])
    def _accumulate():
        x = x_ref[...]
        h = (_silu(_dot(x, wg_ref[...])) * _dot(x, wu_ref[...])).astype(wd_ref.dtype)
        acc_ref[...] += _dot(h, wd_ref[...])

    @pl.when(f == nf - 1)
    def _store():  # the block is stored whole: padding rows as exact zeros, whatever x held there
        acc = acc_ref[...]
        y_ref[...] = jnp.where(_real_rows(tr_ref, n, *acc.shape), acc, 0.0).astype(y_ref.dtype)


def fused_tiles_tpu(x_PD, tile_expert_N, num_tiles, tile_rows_N, wg, wu, wd, *, tm: int, bf: int,
                    interpret=False, out_init=None, out_dtype=None):
    """TPU-style kernel over a padded layout ``x_PD`` (``P = N * tm``). Returns ``y_PD``.

    ``tile_rows_N``: real rows of each tile (``TileMeta.tile_rows_N``); the other rows of the
    output come out as 0. ``out_init`` (optional, ``[P, D]``) is aliased to the output (tests
    pass NaNs to prove every row is written). ``out_dtype`` defaults to x's dtype.
    """
    P, D = x_PD.shape
    E, _, F = wg.shape
    N, nf = P // tm, F // bf
    out_dtype = jnp.dtype(out_dtype or x_PD.dtype)

    def f_eff(n, f, nt_ref):  # unused tiles keep the last used block: no new DMA
        return jnp.where(n < nt_ref[0], f, nf - 1)

    def x_map(n, f, te_ref, nt_ref, tr_ref):
        return jnp.minimum(n, jnp.maximum(nt_ref[0] - 1, 0)), 0

    in_specs = [
        pl.BlockSpec((tm, D), x_map),
        pl.BlockSpec((None, D, bf), lambda n, f, te, nt, tr: (te[n], 0, f_eff(n, f, nt))),
        pl.BlockSpec((None, D, bf), lambda n, f, te, nt, tr: (te[n], 0, f_eff(n, f, nt))),
        pl.BlockSpec((None, bf, D), lambda n, f, te, nt, tr: (te[n], f_eff(n, f, nt), 0)),
    ]
    args = [tile_expert_N, jnp.reshape(num_tiles, (1,)).astype(jnp.int32),
            tile_rows_N.astype(jnp.int32), x_PD, wg, wu, wd]
    aliases = {}
    if out_init is not None:
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        aliases = {len(args): 0}
        args.append(out_init.astype(out_dtype))

    args = vary_all(*args)  # inside shard_map: one manual-axis type for operands and output
    itemsize = jnp.dtype(x_PD.dtype).itemsize
    cost = pl.CostEstimate(flops=6 * P * D * F, transcendentals=P * F,
                           bytes_accessed=3 * E * D * F * itemsize + 2 * P * D * itemsize)
    return pl.pallas_call(
        _tpu_kernel,
        out_shape=out_struct((P, D), out_dtype, *args),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(N, nf),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, D), lambda n, f, te, nt, tr: (n, 0)),
            scratch_shapes=[pltpu.VMEM((tm, D), F32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=bsz.TPU_VMEM_LIMIT),
        input_output_aliases=aliases,
        cost_estimate=cost,
        interpret=interpret,
        name="fused_expert_ffn_tpu",
    )(*args)


# --------------------------------------------------------------------------- GPU (Triton)


def _masked_add(y_ref, idx, val, mask, interpret: bool):
    """``y_ref[idx] += val`` where ``mask``; other elements are neither read nor written.

    Compiled: one masked Triton atomic add. jax's interpreter cannot discharge a masked atomic
    (NotImplementedError in jax 0.10), and it runs programs one at a time, so there the same
    update is a plain masked read-modify-write.
    """
    if not interpret:
        plgpu.atomic_add(y_ref, idx, val, mask=mask)
        return
    cur = y_ref[idx]
    y_ref[idx] = jnp.where(mask, cur + val, cur)


def _gpu_kernel(te_ref, nt_ref, tr_ref, x_ref, wg_ref, wu_ref, wd_ref, y_in_ref, y_ref, *,
                tm: int, bf: int, bk: int, bd: int, interpret: bool):
    del y_in_ref  # aliased to y_ref (the zeroed f32 accumulator)
    n, f = pl.program_id(0), pl.program_id(1)
    D = x_ref.shape[1]

    @pl.when(n < nt_ref[0])
    def _tile():
        e = te_ref[n]
        rows = pl.ds(n * tm, tm)
        cols = pl.ds(f * bf, bf)

        def contract(k, gu):
            g, u = gu
            ks = pl.ds(k * bk, bk)
            xb = plgpu.load(x_ref.at[rows, ks], mask=_real_rows(tr_ref, n, tm, bk), other=0)
            return g + _dot(xb, wg_ref[e, ks, cols]), u + _dot(xb, wu_ref[e, ks, cols])

        zero = jnp.zeros((tm, bf), F32)
        g, u = jax.lax.fori_loop(0, D // bk, contract, (zero, zero))
        h = (_silu(g) * u).astype(wd_ref.dtype)

        real = _real_rows(tr_ref, n, tm, bd)  # padding rows: not loaded above, not added here

        def down(d, carry):
            ds = pl.ds(d * bd, bd)
            _masked_add(y_ref, (rows, ds), _dot(h, wd_ref[e, cols, ds]), real, interpret)
            return carry

        jax.lax.fori_loop(0, D // bd, down, 0)


def fused_tiles_gpu(x_PD, tile_expert_N, num_tiles, tile_rows_N, wg, wu, wd, *, tm: int, bf: int,
                    bk: int, bd: int, num_warps: int = 4, num_stages: int = 2,
                    interpret: bool = False, out_init=None):
    """GPU-style kernel over a padded layout ``x_PD`` (``P = N * tm``). Returns f32 ``y_PD``.

    ``out_init`` (default zeros) is the f32 buffer the programs atomically add into; only the
    real rows of used tiles (``tile_rows_N``) are read from ``x_PD`` and added to, the other
    rows of ``out_init`` come back untouched.
    """
    P, D = x_PD.shape
    F = wg.shape[2]
    N, nf = P // tm, F // bf
    full = lambda a: pl.BlockSpec(a.shape, lambda n, f: (0,) * a.ndim)  # noqa: E731
    nt = jnp.reshape(num_tiles, (1,)).astype(jnp.int32)
    y0 = jnp.zeros((P, D), F32) if out_init is None else out_init.astype(F32)
    tr = tile_rows_N.astype(jnp.int32)
    args = vary_all(tile_expert_N, nt, tr, x_PD, wg, wu, wd, y0)  # shard_map: one manual-axis type
    kernel = functools.partial(_gpu_kernel, tm=tm, bf=bf, bk=bk, bd=bd, interpret=bool(interpret))
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((P, D), F32, *args),
        grid=(N, nf),
        in_specs=[full(a) for a in args],
        out_specs=full(y0),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fused_expert_ffn_gpu",
    )(*args)


# --------------------------------------------------------------------------- entry point


def platform() -> str:
    """The block-size table row of the default backend: "gpu", "tpu" or "cpu"."""
    b = jax.default_backend()
    return "gpu" if b in ("gpu", "cuda", "rocm") else ("tpu" if b == "tpu" else "cpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(kernel, bs, interpret, x_TD, row_src_P, pos_T, tile_expert_N, num_tiles, tile_rows_N,
           wg, wu, wd):
    return _fused_fwd(kernel, bs, interpret, x_TD, row_src_P, pos_T, tile_expert_N, num_tiles,
                      tile_rows_N, wg, wu, wd)[0]


def _fused_fwd(kernel, bs, interpret, x_TD, row_src_P, pos_T, tile_expert_N, num_tiles,
               tile_rows_N, wg, wu, wd):
    cdt = compute_dtype(x_TD, wg)
    T, D = x_TD.shape
    F = wg.shape[2]
    N, P = tile_expert_N.shape[0], row_src_P.shape[0]
    wg_c, wu_c, wd_c = wg.astype(cdt), wu.astype(cdt), wd.astype(cdt)
    x_PD = jnp.take(x_TD.astype(cdt), row_src_P, axis=0, mode="fill", fill_value=0)
    xk, gk, uk, dk = x_PD, wg_c, wu_c, wd_c
    Fp, Dp = bs.f_pad or F, bs.d_pad or D
    if (Fp, Dp) != (F, D):  # fallback: zero channels contribute silu(0) * 0 = 0
        xk = jnp.pad(x_PD, ((0, 0), (0, Dp - D)))
        gk = jnp.pad(wg_c, ((0, 0), (0, Dp - D), (0, Fp - F)))
        uk = jnp.pad(wu_c, ((0, 0), (0, Dp - D), (0, Fp - F)))
        dk = jnp.pad(wd_c, ((0, 0), (0, Fp - F), (0, Dp - D)))
    if kernel == "tpu":
        y_PD = fused_tiles_tpu(xk, tile_expert_N, num_tiles, tile_rows_N, gk, uk, dk, tm=bs.tm, bf=bs.bf,
                               interpret=interpret, out_dtype=F32)
    else:
        y_PD = fused_tiles_gpu(xk, tile_expert_N, num_tiles, tile_rows_N, gk, uk, dk, tm=bs.tm, bf=bs.bf,
                               bk=bs.bk, bd=bs.bd, num_warps=bs.num_warps,
                               num_stages=bs.num_stages, interpret=interpret)
    y = jnp.take(y_PD[:, :D], pos_T, axis=0, mode="fill", fill_value=0).astype(x_TD.dtype)
    res = (x_PD.reshape(N, P // N, D), row_src_P, pos_T, tile_expert_N, num_tiles, wg, wu, wd)
    return y, res


def _fused_bwd(kernel, bs, interpret, res, dy):
    del kernel, bs, interpret
    dx, d_src, d_pos, d_te, d_nt, dwg, dwu, dwd = tiled_ffn_bwd(res, dy)
    return dx, d_src, d_pos, d_te, d_nt, None, dwg, dwu, dwd  # None: tile_rows_N (integer)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _shard_map_interpreter(kernel: str):
    """The interpreter for a kernel called inside ``jax.shard_map`` (inputs with manual axes).

    jax 0.10's default interpreter (``interpret=True``) evaluates index maps and kernel bodies
    with program ids that vary over no mesh axis next to operands that do, and its manual-axis
    check rejects that; the Mosaic TPU interpreter (``pltpu.InterpretParams``) is built to run
    per device inside shard_map and accepts it. The Triton kernel has no such interpreter (its
    atomic adds are Triton primitives), so it runs inside shard_map only compiled on a GPU.
    """
    if kernel == "gpu":
        raise ShapeError("expert_ffn(impl='pallas', kernel='gpu'): the GPU kernel cannot be "
                         "interpreted inside jax.shard_map (jax's interpreter rejects its manual "
                         "axes); inside shard_map use kernel='tpu' with interpret, or run the "
                         "compiled kernel on a GPU")
    return pltpu.InterpretParams()


def pallas_ffn(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD, *, backend: str | None = None,
               kernel: str | None = None, block_sizes: bsz.BlockSizes | None = None,
               interpret: bool | None = None):
    """Fused expert FFN on ``x_TD [T, D]`` (inputs already validated by ``ops.expert_ffn``).

    ``backend``: block-size table row, default from ``jax.default_backend()``. ``kernel``:
    "tpu" or "gpu"; default "gpu" on GPU, else "tpu". ``interpret``: default False only when
    the kernel matches the device (gpu kernel on a GPU, tpu kernel on a TPU), else True; inside
    ``jax.shard_map`` True means the Mosaic TPU interpreter (``_shard_map_interpreter``).
    ``block_sizes``: override the table (``kernels.block_sizes.choose``).
    """
    backend = backend or platform()
    if backend not in bsz.BACKENDS:
        raise ShapeError(f"expert_ffn(impl='pallas'): backend must be one of {bsz.BACKENDS}, "
                         f"got {backend!r}")
    kernel = kernel or ("gpu" if backend == "gpu" else "tpu")
    if kernel not in KERNELS:
        raise ShapeError(f"expert_ffn(impl='pallas'): kernel must be one of {KERNELS}, got {kernel!r}")
    if interpret is None:  # compile only where the kernel matches the device; else interpret
        interpret = platform() != kernel
    if interpret is True and union_axes(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD):
        interpret = _shard_map_interpreter(kernel)  # an explicit pltpu.InterpretParams is kept
    T, D = x_TD.shape
    E, _, F = wg_EDF.shape
    itemsize = jnp.dtype(compute_dtype(x_TD, wg_EDF)).itemsize
    bs = block_sizes or bsz.choose(backend, T, E, D, F, itemsize)
    bsz.validate(bs, kernel, D, F)
    m = grouping.tile_layout(expert_T, E, bs.tm)
    return _fused(kernel, bs, interpret, x_TD, m.row_src_P, m.pos_T, m.tile_expert_N,
                  m.num_tiles, m.tile_rows_N, wg_EDF, wu_EDF, wd_EFD)
