"""Block sizes of the fused expert-FFN kernel per backend: a small table plus a fallback rule.

``choose(backend, T, E, D, F, dtype)`` returns a :class:`BlockSizes`. How each field is chosen:

- ``tm`` (token rows per tile; every tile holds ONE expert's tokens, groups padded to ``tm``):
  the average group size ``ceil(T / min(E, T))`` rounded up to a power of two, clipped to the
  backend's ``[tm_min, tm_max]``. Decode batches (few tokens per expert) get one small tile per
  expert, so each expert's weights are streamed once; prefill gets big tiles for matmul
  efficiency. ``tm_min`` is the smallest MMA-friendly tile: 16 rows (Triton ``tl.dot`` needs
  M >= 16; TPU bf16 packs 16 sublanes).
- ``bf`` (FFN columns per step; the [tm, F] hidden never leaves the core): GPU -- the largest
  power of two <= 128 dividing F, halved (down to 32) while the grid ``N * F/bf`` has fewer than
  two programs per SM (132 SMs on an H100), since decode is bandwidth-bound and needs every SM
  streaming weights; TPU -- the largest multiple of 128 <= 512 dividing F (or F when F <= 512);
  CPU interpret -- the largest divisor of F <= 256 (fewer grid steps interpret faster).
- ``bk``/``bd`` (GPU only: D chunk of the gate/up contraction and of the down-projection
  output): the largest power of two <= 64 / <= 128 dividing D.
- Fallback: when F (or D on GPU) has no admissible divisor, the wrapper zero-pads the weights
  to ``f_pad``/``d_pad`` (exact: padded channels contribute silu(0)*0 = 0). This copies the
  weights on every call, so real checkpoints should have aligned sizes (SmolLM2 D=576 F_e=768
  and Llama-2-7B D=4096 F_e=5504 need no padding).
- TPU VMEM: ``tm`` then ``bf`` are halved until the double-buffered blocks fit
  ``TPU_VMEM_BUDGET`` (the limit handed to Mosaic is ``TPU_VMEM_LIMIT``).

The numbers are starting points chosen from the hardware rules above, not from a tuning sweep
on the device (none was available when written); ``benchmarks`` in docs/KERNELS.md says how to
sweep them on an H100.
"""

from __future__ import annotations

import dataclasses

from readme_jax.errors import ShapeError

H100_SMS = 132
TPU_VMEM_BUDGET = 40 * 2**20
TPU_VMEM_LIMIT = 48 * 2**20

# backend -> knobs of the rule above.
TABLE = {
    "gpu": dict(tm_min=16, tm_max=64, bf_max=128, bf_min=32, bk_max=64, bd_max=128,
                num_warps=4, num_stages=3),
    "tpu": dict(tm_min=16, tm_max=256, bf_max=512, lane=128),
    "cpu": dict(tm_min=8, tm_max=64, bf_max=256, bk_max=128, bd_max=128),
}
BACKENDS = tuple(TABLE)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Static kernel configuration (hashable: it is a ``custom_vjp`` non-diff argument)."""

    tm: int
    bf: int
    bk: int = 0  # GPU-kernel D chunk for gate/up (0 = whole D)
    bd: int = 0  # GPU-kernel D chunk for the down-projection output (0 = whole D)
    f_pad: int = 0  # F after zero-padding (0 = no padding)
    d_pad: int = 0  # D after zero-padding (0 = no padding)
    num_warps: int = 4
    num_stages: int = 2


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _divisor(n: int, cap: int, step: int = 1) -> int:
    """Largest multiple of ``step`` <= cap dividing n (0 if none)."""
    for b in range(min(cap, n) // step * step, 0, -step):
        if n % b == 0:
            return b
    return 0


def _tile_rows(T: int, E: int, tm_min: int, tm_max: int) -> int:
    avg = -(-T // max(min(E, T), 1))
    return max(tm_min, min(tm_max, _pow2_ceil(avg)))


def num_tiles_bound(T: int, E: int, tm: int) -> int:
    """Static tile count of the padded layout (same as ``kernels.grouping.max_tiles``)."""
    return 1 if T == 0 else -(-T // tm) + min(E, T) - 1


def tpu_vmem_bytes(tm: int, D: int, bf: int, itemsize: int) -> int:
    """VMEM the TPU kernel needs: double-buffered x, 3 weight blocks and out; f32 acc and temps."""
    return (2 * tm * D * itemsize + 2 * 3 * D * bf * itemsize + 2 * tm * D * 4
            + tm * D * 4 + 3 * tm * bf * 4)


def choose(backend: str, T: int, E: int, D: int, F: int, itemsize: int = 2) -> BlockSizes:
    """Block sizes for ``backend`` in {"gpu", "tpu", "cpu"} (see the module docstring)."""
    if backend not in TABLE:
        raise ShapeError(f"block_sizes.choose: backend must be one of {BACKENDS}, got {backend!r}")
    k = TABLE[backend]
    tm = _tile_rows(T, E, k["tm_min"], k["tm_max"])
    if backend == "gpu":
        f_pad = F if _pow2_divisor(F, k["bf_max"]) >= 16 else -(-F // 64) * 64
        d_pad = D if _pow2_divisor(D, k["bd_max"]) >= 16 else -(-D // 64) * 64
        bf = _pow2_divisor(f_pad, k["bf_max"])
        n_tiles = num_tiles_bound(T, E, tm)
        while bf > k["bf_min"] and n_tiles * (f_pad // bf) < 2 * H100_SMS and f_pad % (bf // 2) == 0:
            bf //= 2
        return BlockSizes(tm=tm, bf=bf, bk=_pow2_divisor(d_pad, k["bk_max"]),
                          bd=_pow2_divisor(d_pad, k["bd_max"]),
                          f_pad=0 if f_pad == F else f_pad, d_pad=0 if d_pad == D else d_pad,
                          num_warps=k["num_warps"], num_stages=k["num_stages"])
    if backend == "tpu":
        lane = k["lane"]
        if F % lane == 0:
            f_pad, bf = F, _divisor(F, k["bf_max"], lane)
        elif F <= k["bf_max"]:
            f_pad, bf = F, F
        else:
            f_pad = -(-F // lane) * lane
            bf = _divisor(f_pad, k["bf_max"], lane)
        while tpu_vmem_bytes(tm, D, bf, itemsize) > TPU_VMEM_BUDGET and tm > k["tm_min"]:
            tm //= 2
        while (tpu_vmem_bytes(tm, D, bf, itemsize) > TPU_VMEM_BUDGET and bf > lane
               and bf % (2 * lane) == 0):
            bf //= 2
        return BlockSizes(tm=tm, bf=bf, f_pad=0 if f_pad == F else f_pad)
    bf = _divisor(F, k["bf_max"])
    return BlockSizes(tm=tm, bf=bf, bk=_divisor(D, k["bk_max"]), bd=_divisor(D, k["bd_max"]))


def validate(bs: BlockSizes, kernel: str, D: int, F: int) -> None:
    """Raise ShapeError if ``bs`` cannot tile [D, F] for ``kernel`` in {"gpu", "tpu"}."""
    Fp, Dp = bs.f_pad or F, bs.d_pad or D
    problems = []
    if bs.tm < 1 or bs.bf < 1:
        problems.append(f"tm={bs.tm} and bf={bs.bf} must be positive")
    elif Fp % bs.bf:
        problems.append(f"bf={bs.bf} does not divide F={Fp}")
    if Fp < F or Dp < D:
        problems.append(f"padding f_pad={bs.f_pad}, d_pad={bs.d_pad} is smaller than F={F}, D={D}")
    if kernel == "gpu":
        for name in ("bk", "bd"):
            b = getattr(bs, name)
            if b < 1 or Dp % b:
                problems.append(f"{name}={b} does not divide D={Dp}")
    if problems:
        raise ShapeError(f"expert_ffn(impl='pallas'): block sizes {bs} do not fit the weights "
                         f"(D={D}, F={F}): " + "; ".join(problems))


__all__ = ["BlockSizes", "choose", "validate", "TABLE", "num_tiles_bound", "tpu_vmem_bytes"]
