"""Ghost norms: per-example gradient norms of dense, conv and embedding weights (certified upper bounds), no
per-example gradients.

A weight W that enters one example's loss only as an operand of `dot_general` ops
(y_u = x_u W: dense layers, attention projections, tied uses) has the per-example gradient
G = sum_u x_u^T dY_u. Stacking the uses' inputs X (N x K) and output cotangents D (N x M):
  ||G||^2 = sum((X X^T) * (D D^T))      O(N^2 (K + M)), chosen when cheaper than
  ||G||^2 = sum((X^T D)^2)              O(N K M) (N: positions, e.g. sequence length),
each computed on X and D scaled by powers of two (so no square under- or overflows, `_scale`) and
widened by its float32 rounding error bound, so the clip factor never lets an example add more than C
(`_norm_bound`), and the weighted sum over a batch, sum_i w_i G_i = X_all^T (w * D_all), is one ordinary
weight-gradient matmul. X and D come out of ONE per-example forward/backward pass: the loss is
re-evaluated from its traced jaxpr with a zero perturbation z added to each such dot_general's
output, so dL/dz = dY exactly while W itself is not differentiated.

A convolution kernel is the same case: the output is the dot of the input's patches (the window
at each output position, exact copies of input entries or padding zeros; N output positions,
K = C_in x window) with the kernel, so X is the patch matrix (`_ConvUse`).

A table E that enters only through row lookups (`gather` of whole rows: `jnp.take(E, ids, axis=0)`,
`E[ids]`; token, position and class embeddings) is handled from the same pass: its per-example
gradient is G = sum_s e_{r_s} D_s^T (r_s the row read at lookup s), so
  ||G||^2 = sum([r_s = r_t] * (D D^T)_st)    O(N^2 M), the row-equality matrix exact,
and the weighted batch sum is one scatter-add of the rows w_i D_i. No (V x M) gradient per example.

A stacked leaf that a `scan` slices along its leading axis (the weights of L layers run by one scanned block,
`jax.lax.scan(body, h, stacked)`) is handled inside the scan body: each layer's slice is a weight of its own, its
X and D are scanned outputs and inputs of the same pass, and the example's squared norm adds the L layers'.

Every other leaf (biases, scales, weights used any other way, inside conditionals or a scan's constants, or
sliced by a scan inside a scan) is returned for the caller to handle with materialized per-example gradients.
Generic over the loss: nothing here knows about models.
"""

from collections.abc import Callable, Sequence
import dataclasses
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.extend  # registers jax.extend.core
from jax.extend import core as jcore
from jax.extend.core import primitives as prims
import jax.numpy as jnp
import numpy as np

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST
_INLINE_PARAM = {prims.jit_p: "jaxpr", prims.closed_call_p: "call_jaxpr"}


@dataclasses.dataclass(frozen=True)
class _Use:
    """One dot_general use of weight leaf `param`, and how to bring it to canonical (K, M) form."""

    param: int
    x_perm: tuple[int, ...]  # transposes x to (x free dims..., x contracting dims)
    out_perm: tuple[int, ...]  # transposes the output to (x free dims..., W free dims...)
    w_order: tuple[int, ...]  # W's contracting dims then free dims: canonical layout of G
    n: int
    k: int
    m: int
    out: jax.ShapeDtypeStruct  # per-example output of the dot_general (shape of z)
    layers: int | None = None  # L: a use inside a scan over the leaf's leading axis (`out` per layer)

    @property
    def layout(self) -> tuple[Any, ...]:
        return (self.w_order, self.k, self.m, self.layers)

    def canonical(self, x: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Batched (B, ...) x and dY -> float32 (B, N, K) and (B, N, M)."""
        b = x.shape[0]
        xc = jnp.transpose(x, (0,) + tuple(p + 1 for p in self.x_perm)).reshape(b, self.n, self.k)
        dc = jnp.transpose(dy, (0,) + tuple(p + 1 for p in self.out_perm)).reshape(b, self.n, self.m)
        return xc.astype(jnp.float32), dc.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _ConvUse:
    """One convolution with weight leaf `param` as its kernel: a dot_general of the input's patches (N output
    positions x K = C_in * window entries, exact copies of input entries or padding zeros) with the kernel."""

    param: int
    dims: Any  # ConvDimensionNumbers of the convolution
    window: tuple[int, ...]  # the kernel's spatial shape, in the input's spatial order
    conv: dict[str, Any]  # window_strides, padding, lhs_dilation, rhs_dilation
    w_order: tuple[int, ...]  # the kernel's input-feature dim, spatial dims, output-feature dim
    n: int
    k: int
    m: int
    out: jax.ShapeDtypeStruct
    layers: int | None = None  # L: a use inside a scan over the leaf's leading axis (`out` per layer)

    @property
    def layout(self) -> tuple[Any, ...]:
        return (self.w_order, self.k, self.m, self.layers)

    def canonical(self, x: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Batched (B, ...) input and dY -> float32 (B, N, K) patches and (B, N, M), K ordered (C_in, window)."""
        b, last = x.shape[0], lambda spec: (0, spec[0] + 1, *(d + 1 for d in spec[2:]), spec[1] + 1)  # (B, N, ..., C)
        d = jnp.transpose(dy, last(self.dims.out_spec))
        patches = _patches(jnp.transpose(x, last(self.dims.lhs_spec)), self.window, d.shape[2:-1], **self.conv)
        return (patches.reshape(b, self.n, self.k).astype(jnp.float32),
                d.reshape(b, self.n, self.m).astype(jnp.float32))


def _patches(x: jax.Array, window: tuple[int, ...], out: tuple[int, ...], *, window_strides, padding, lhs_dilation,
             rhs_dilation) -> jax.Array:
    """(..., *out, C * prod(window)) windows of the (..., *spatial, C) input `x` as the convolution reads them, C-major:
    strided slices of the padded (and lhs-dilated) input, one per window offset, so every entry is a copy."""
    lead = x.ndim - len(window) - 1
    config = [(0, 0, 0)] * lead + [(lo, hi, dil - 1) for (lo, hi), dil in zip(padding, lhs_dilation)] + [(0, 0, 0)]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    slices = []
    for offset in itertools.product(*(range(w) for w in window)):
        start = [0] * lead + [o * r for o, r in zip(offset, rhs_dilation)] + [0]
        limit = x.shape[:lead] + tuple(s + (n - 1) * st + 1 for s, n, st in zip(start[lead:], out, window_strides))
        slices.append(jax.lax.slice(x, start, limit + x.shape[-1:], [1] * lead + list(window_strides) + [1]))
    stacked = jnp.stack(slices, axis=-1)  # (..., *out, C, window entries)
    return stacked.reshape(stacked.shape[:-2] + (-1,))


@dataclasses.dataclass(frozen=True)
class _Lookup:
    """One row lookup of table leaf `param` (V rows of M entries): the output holds N rows of the table."""

    param: int
    v: int
    m: int
    clamp: bool  # indices out of [0, V) read the nearest row (CLIP, PROMISE_IN_BOUNDS); else no row (FILL_OR_DROP)
    out: jax.ShapeDtypeStruct  # per-example output of the gather (shape of z)
    layers: int | None = None  # L: a use inside a scan over the leaf's leading axis (`out` per layer)

    @property
    def layout(self) -> tuple[Any, ...]:
        return ("lookup", self.v, self.m, self.layers)

    def canonical(self, ids: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Batched (B, ..., 1) indices and dY -> (B, N) int32 rows (V: none) and float32 (B, N, M)."""
        b = ids.shape[0]
        ids = ids.reshape(b, -1).astype(jnp.int32)
        rows = jnp.clip(ids, 0, self.v - 1) if self.clamp else jnp.where((ids >= 0) & (ids < self.v), ids, self.v)
        return rows, dy.reshape(b, rows.shape[1], self.m).astype(jnp.float32)


class GhostResult(NamedTuple):
    """What `ghost_norms` returns for one (micro)batch.

    Attributes:
      losses: (B,) per-example losses.
      dense_norms: (B,) float32 certified upper bounds on the gradient norms over the ghost-handled
        leaves (within a relative 1e-4 of the exact value on real models; not finite where X or D is not).
      fallback_grads: per-example gradients (leading axis B) of the other leaves, `None` at
        ghost-handled ones.
      dense_sum: `dense_sum(weights)` -> sum_i weights_i * G_i (float32) for the ghost-handled
        leaves, `None` elsewhere; rows with weight 0 contribute exactly 0.
    """

    losses: jax.Array
    dense_norms: jax.Array
    fallback_grads: PyTree
    dense_sum: Callable[[jax.Array], PyTree]


def _owned_dot(eqn: Any, owners: list[int | None]) -> tuple[int, int] | None:
    """(param, operand index of W) if `eqn` is a dot_general with exactly one weight operand."""
    if eqn.primitive is not prims.dot_general_p:
        return None
    held = [(o, side) for side, o in enumerate(owners) if o is not None]
    if len(held) != 1:
        return None
    (lb, rb) = eqn.params["dimension_numbers"][1]
    if lb or rb:
        return None
    return held[0]


_ROW_MODES = {
    jax.lax.GatherScatterMode.CLIP: True,
    jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS: True,
    jax.lax.GatherScatterMode.FILL_OR_DROP: False,
}


def _owned_lookup(eqn: Any, owners: list[int | None]) -> int | None:
    """The table's param if `eqn` gathers whole rows of one weight at non-weight indices (shape (..., 1))."""
    if eqn.primitive is not prims.gather_p or owners[0] is None or owners[1] is not None:
        return None
    dims, table, ids = eqn.params["dimension_numbers"], eqn.invars[0].aval, eqn.invars[1].aval
    lead, rest = ids.ndim - 1, tuple(table.shape[1:])
    whole_rows = (
        table.ndim >= 1
        and ids.shape[-1:] == (1,)
        and tuple(dims.collapsed_slice_dims) == (0,)
        and tuple(dims.start_index_map) == (0,)
        and tuple(dims.offset_dims) == tuple(range(lead, lead + len(rest)))
        and not dims.operand_batching_dims
        and tuple(eqn.params["slice_sizes"]) == (1,) + rest
        and eqn.params["mode"] in _ROW_MODES
    )
    return owners[0] if whole_rows else None


def _owned_conv(eqn: Any, owners: list[int | None]) -> int | None:
    """The kernel's param if `eqn` convolves a non-weight input with a weight kernel, without feature groups."""
    if eqn.primitive is not prims.conv_general_dilated_p or owners[0] is not None or owners[1] is None:
        return None
    return owners[1] if eqn.params["feature_group_count"] == eqn.params["batch_group_count"] == 1 else None


def _owned_use(eqn: Any, owners: list[int | None]) -> tuple[int, int] | None:
    """(param, operand index of the weight) of a weight use ghost can handle: a dot_general, a convolution's
    kernel or a row lookup."""
    if (table := _owned_lookup(eqn, owners)) is not None:
        return table, 0
    if (kernel := _owned_conv(eqn, owners)) is not None:
        return kernel, 1
    return _owned_dot(eqn, owners)


def _is_cast(eqn: Any, owners: list[int | None]) -> bool:
    """A dtype cast of a weight (e.g. to bfloat16 activations): its uses count as the weight's."""
    return eqn.primitive is prims.convert_element_type_p and owners[0] is not None


def _make_use(eqn: Any, param: int, side: int, layers: int | None) -> _Use | _ConvUse | _Lookup:
    out = jax.ShapeDtypeStruct(eqn.outvars[0].aval.shape, eqn.outvars[0].aval.dtype)
    if eqn.primitive is prims.gather_p:
        table = eqn.invars[0].aval.shape
        return _Lookup(param, table[0], math.prod(table[1:]), _ROW_MODES[eqn.params["mode"]], out, layers)
    if eqn.primitive is prims.conv_general_dilated_p:
        dims, kernel = eqn.params["dimension_numbers"], eqn.invars[1].aval.shape
        window = tuple(kernel[d] for d in dims.rhs_spec[2:])
        return _ConvUse(
            param=param,
            dims=dims,
            window=window,
            conv={name: eqn.params[name] for name in ("window_strides", "padding", "lhs_dilation", "rhs_dilation")},
            w_order=(dims.rhs_spec[1], *dims.rhs_spec[2:], dims.rhs_spec[0]),
            n=math.prod(out.shape[d] for d in (dims.out_spec[0], *dims.out_spec[2:])),
            k=kernel[dims.rhs_spec[1]] * math.prod(window),
            m=kernel[dims.rhs_spec[0]],
            out=out,
            layers=layers,
        )
    (lc, rc), _ = eqn.params["dimension_numbers"]
    w_c, x_c = (lc, rc) if side == 0 else (rc, lc)
    w_shape, x_shape = eqn.invars[side].aval.shape, eqn.invars[1 - side].aval.shape
    pairs = sorted(zip(w_c, x_c))
    w_contract = tuple(int(w) for w, _ in pairs)
    x_contract = tuple(int(x) for _, x in pairs)
    w_free = tuple(d for d in range(len(w_shape)) if d not in w_c)
    x_free = tuple(d for d in range(len(x_shape)) if d not in x_c)
    nw, nx = len(w_free), len(x_free)
    out_perm = (
        tuple(range(nx)) + tuple(range(nx, nx + nw)) if side == 1 else (tuple(range(nw, nw + nx)) + tuple(range(nw)))
    )
    return _Use(
        param=param,
        x_perm=x_free + x_contract,
        out_perm=out_perm,
        w_order=w_contract + w_free,
        n=math.prod(x_shape[d] for d in x_free),
        k=math.prod(w_shape[d] for d in w_contract),
        m=math.prod(w_shape[d] for d in w_free),
        out=out,
        layers=layers,
    )


def _scan_owners(eqn: Any, in_own: list[int | None], layers: int | None) -> list[int | None] | None:
    """The owners of a scan body's inputs when `eqn` is a scan that slices weights (its scanned inputs, not its
    constants or carry, and not inside another scan); None otherwise."""
    if eqn.primitive is not prims.scan_p or layers is not None:
        return None
    fixed = eqn.params["num_consts"] + eqn.params["num_carry"]
    if all(o is None for o in in_own[fixed:]):
        return None
    return [None] * fixed + in_own[fixed:]


def _analyze(jaxpr: Any, owners: list[int | None], uses: list[_Use | _ConvUse | _Lookup], other: set[int],
             layers: int | None = None) -> None:
    """Records every use of a weight that `_owned_use` accepts (in evaluation order; inside a scan over L layers
    with `layers` L) and every other use."""
    own: dict[Any, int] = {v: o for v, o in zip(jaxpr.invars, owners) if o is not None}
    of = lambda vs: [None if isinstance(v, jcore.Literal) else own.get(v) for v in vs]
    for eqn in jaxpr.eqns:
        in_own = of(eqn.invars)
        if eqn.primitive in _INLINE_PARAM:
            _analyze(eqn.params[_INLINE_PARAM[eqn.primitive]].jaxpr, in_own, uses, other, layers)
        elif (body_owners := _scan_owners(eqn, in_own, layers)) is not None:
            other.update(o for o, b in zip(in_own, body_owners) if o is not None and b is None)
            _analyze(eqn.params["jaxpr"].jaxpr, body_owners, uses, other, eqn.params["length"])
        elif (hit := _owned_use(eqn, in_own)) is not None:
            uses.append(_make_use(eqn, *hit, layers))
        elif _is_cast(eqn, in_own):
            own[eqn.outvars[0]] = in_own[0]
        else:
            other.update(o for o in in_own if o is not None)
    other.update(o for o in of(jaxpr.outvars) if o is not None)


class _Taps:
    """What the re-evaluated loss does at each use of a ghost-handled weight, in evaluation order: records its
    input X (`xs`) and adds the next zero perturbation of `zs` to its output, so that dL/dz = dY."""

    def __init__(self, zs: Sequence[jax.Array], dense: set[int]):
        self.zs, self.dense, self.xs = list(zs), dense, []

    def __call__(self, out: jax.Array, param: int, side: int, invals: list[Any]) -> jax.Array:
        if param not in self.dense:
            return out
        self.xs.append(invals[1 - side])
        return out + self.zs[len(self.xs) - 1]


def _tapped_scan(eqn: Any, invals: list[Any], body_owners: list[int | None], taps: _Taps) -> list[Any]:
    """A scan over weight slices, evaluated with the body's uses tapped: their perturbations are the next
    `zs` (stacked over the layers), scanned in; their inputs X are stacked scan outputs."""
    body, n_consts, n_carry = eqn.params["jaxpr"], eqn.params["num_consts"], eqn.params["num_carry"]
    fixed = n_consts + n_carry
    uses: list[Any] = []
    _analyze(body.jaxpr, body_owners, uses, set(), eqn.params["length"])
    count = sum(u.param in taps.dense for u in uses)
    zs = taps.zs[len(taps.xs):len(taps.xs) + count]
    consts = invals[:n_consts]

    def step(carry, sliced):
        xs, z = sliced
        inner = _Taps(z, taps.dense)
        outs = _evaluate(body.jaxpr, body.consts, [*consts, *carry, *xs], body_owners, inner, eqn.params["length"])
        return outs[:n_carry], (outs[n_carry:], inner.xs)

    carry, (ys, tapped) = jax.lax.scan(step, invals[n_consts:fixed], (invals[fixed:], zs),
                                       length=eqn.params["length"], reverse=eqn.params["reverse"],
                                       unroll=eqn.params["unroll"])
    taps.xs.extend(tapped)
    return [*carry, *ys]


def _evaluate(jaxpr: Any, consts: list[Any], args: list[Any], owners: list[int | None], taps: _Taps,
              layers: int | None = None) -> list[Any]:
    """`jax.core.eval_jaxpr`, inlining jit calls; `taps` replaces the outputs of the weight uses that `_analyze`
    recorded (`layers` as there)."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    own: dict[Any, int] = {v: o for v, o in zip(jaxpr.invars, owners) if o is not None}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        in_own = [None if isinstance(v, jcore.Literal) else own.get(v) for v in eqn.invars]
        if eqn.primitive in _INLINE_PARAM:
            closed = eqn.params[_INLINE_PARAM[eqn.primitive]]
            outs = _evaluate(closed.jaxpr, closed.consts, invals, in_own, taps, layers)
        elif (body_owners := _scan_owners(eqn, in_own, layers)) is not None:
            outs = _tapped_scan(eqn, invals, body_owners, taps)
        else:
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = out if eqn.primitive.multiple_results else [out]
            if (hit := _owned_use(eqn, in_own)) is not None:
                outs = [taps(outs[0], hit[0], hit[1], invals)]
            elif _is_cast(eqn, in_own):
                own[eqn.outvars[0]] = in_own[0]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


_U = 1.01 * 2.0**-24  # float32 unit roundoff, with slack for the first-order error bounds below


def _pow2(e: jax.Array) -> jax.Array:
    """2.0**e in float32 for int32 e in [-126, 127], exactly (from the bits: no rounding, no subnormal)."""
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(e + 127, 23), jnp.float32)


def _times_pow2(a: jax.Array, e: jax.Array) -> jax.Array:
    """a * 2^e for int32 e in [-252, 252]: two exact steps of the same direction, so nothing under- or
    overflows midway that the result would not."""
    half = jax.lax.shift_right_arithmetic(e, 1)  # floor(e / 2)
    return a * _pow2(half) * _pow2(e - half)


def _row_exponents(a: jax.Array) -> jax.Array:
    """(B,) int32 e in [-126, 126]: every entry of row b of the (B, ...) array `a` is below 2^e_b in magnitude
    (below 2^(e_b + 2) if it reaches 2^126). Read from the bits of the row maxima: exact in any subnormal mode."""
    peak = jnp.max(jnp.abs(a.astype(jnp.float32)).reshape(a.shape[0], -1), axis=1)
    biased = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(peak, jnp.int32), 23)
    return jnp.clip(biased - 126, -126, 126)


def _scaled_rows(a: jax.Array, e: jax.Array) -> jax.Array:
    """Float32 a * 2^-e_b for each row b of a (B, ...) array."""
    return a.astype(jnp.float32) * _pow2(-e).reshape((-1,) + (1,) * (a.ndim - 1))


def _row_norms(a: jax.Array) -> jax.Array:
    """(B,) float32 L2 norm of each row of a (B, ...) array, never squaring out of range.

    Each row is scaled by a power of two (exactly) so that its largest entry lies in [1/2, 4) (below 1/2
    only if subnormal): no square overflows, a square that underflows is below 2^-124 of the largest one,
    and the norm is scaled back. A row holding NaN or inf has a non-finite norm.
    """
    e = _row_exponents(a)
    return _times_pow2(jnp.sqrt(jnp.sum(jnp.square(_scaled_rows(a, e)).reshape(a.shape[0], -1), axis=1)), e)


def l2_norms(parts: Sequence[jax.Array]) -> jax.Array:
    """(B,) float32 L2 norm over row b of all the (B, ...) arrays in `parts`, never squaring out of range.

    The norm of the parts' row norms (`_row_norms`), so that each part is scaled by its own row maxima: a
    scale shared by all parts is a chain over the parts that XLA would recompute for every entry.
    """
    return _row_norms(jnp.stack([_row_norms(p) for p in parts], axis=1))


class _Scaled(NamedTuple):
    """One weight's stacked X and D of each example, scaled: X_b^T D_b = 2^e_b x_b^T d_b."""

    x: jax.Array  # (B, N, K) X_b * 2^-ex_b: entries below 4 in magnitude (below 1 unless X_b reaches 2^126)
    d: jax.Array  # (B, N, M) D_b * 2^-ed_b, the same
    e: jax.Array  # (B,) int32 ex + ed


def _scale(x: jax.Array, d: jax.Array) -> _Scaled:
    """Scales each example's X and D by powers of two so that no square or product of theirs overflows and
    only entries below 2^-62 of the largest have squares that underflow (unscaled, an entry of 1e-23 has a
    square of 0)."""
    ex, ed = _row_exponents(x), _row_exponents(d)
    return _Scaled(_scaled_rows(x, ex), _scaled_rows(d, ed), ex + ed)


def _norm_bound(x: jax.Array, d: jax.Array) -> jax.Array:
    """(B,) certified upper bounds on the Frobenius norm of X_i^T D_i as float32 computes it.

    The norm is computed by Gram matrices, sum((X X^T) * (D D^T)), when that is cheaper than forming
    X^T D, and that formula cancels: two nearly parallel rows with opposite cotangents can make it read
    0 for a gradient of norm 4. So both formulas are widened by their float32 rounding error bound
    (first-order bounds, u the unit roundoff, computed from the Gram matrices and the row norms), plus
    2 (N + 2) u T, T = sum_n |x_n| |d_n|, for the rounding of the batched sum X^T (w D) that the
    clipped gradient is added with; the result is capped by T (the triangle inequality) widened the
    same way. An example whose norm cancels is clipped harder, never added with more than C; on real
    models the widening is about 1e-5 of the norm (tests/privacy/test_ghost.py).

    Underflow: X and D come scaled by `_scale` (entries below 4 in magnitude). A row norm then loses less
    than 2^-62 sqrt(K) to squares that underflow, so that much is added to each; every other float32
    operation loses at most 2^-126 (flushed subnormals included), which moves the bound by less than
    2^-58 (N + 1) sqrt((K + 1) (M + 1)): 4 times that is added.
    """
    n, k, m = x.shape[1], x.shape[2], d.shape[2]
    nx, nd = _padded_row_norms(x), _padded_row_norms(d)
    t = jnp.sum(nx * nd, axis=1) * (1 + (k + m + n + 4) * _U)
    if n * (k + m) < k * m:
        gx = jnp.einsum("bnk,bsk->bns", x, x, precision=_HIGHEST)
        base = _gram_square(gx, k, nx, d, nd, t)
    else:
        g = jnp.einsum("bnk,bnm->bkm", x, d, precision=_HIGHEST)
        sq = jnp.sum(jnp.einsum("bkm,bkm->bk", g, g, precision=_HIGHEST), axis=1)
        base = sq * (1 + (k + m + 4) * _U)
    return _widened(base, t, n, k, m)


def _lookup_norm_bound(rows: jax.Array, d: jax.Array, v: int) -> jax.Array:
    """(B,) certified upper bounds on the Frobenius norm of sum_s e_{rows_s} d_s^T (rows >= v read no row).

    `_norm_bound` with X the one-hot rows: X X^T is the row-equality matrix, exact, so its rounding term
    is 0; each X row has norm 1 (or 0) and one nonzero entry (K = 1 in the underflow term).
    """
    n, m = d.shape[1], d.shape[2]
    valid = rows < v
    nx, nd = valid.astype(jnp.float32), _padded_row_norms(d)
    t = jnp.sum(nx * nd, axis=1) * (1 + (m + n + 5) * _U)
    same = (rows[:, :, None] == rows[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return _widened(_gram_square(same.astype(jnp.float32), None, nx, d, nd, t), t, n, 1, m)


def _padded_row_norms(a: jax.Array) -> jax.Array:
    """(B, N) norms of the rows of a scaled (B, N, K) array, plus what squares that underflow may lose."""
    return jnp.linalg.norm(a, axis=2) + 2.0**-62 * math.sqrt(a.shape[2])


def _gram_square(gx: jax.Array, k: int | None, nx: jax.Array, d: jax.Array, nd: jax.Array, t: jax.Array) -> jax.Array:
    """sum(gx * (D D^T)) widened by its first-order rounding error; gx = X X^T computed from rows of length k
    (None: gx is exact)."""
    n, m = d.shape[1], d.shape[2]
    gd = jnp.einsum("bnm,bsm->bns", d, d, precision=_HIGHEST)
    total = lambda a: jnp.sum(jnp.sum(a, axis=2), axis=1)
    outer = lambda v: v[:, :, None] * v[:, None, :]
    sq = total(gx * gd)
    x_rounding = 0.0 if k is None else (k + 2) * total(outer(nx) * jnp.abs(gd))
    error = (x_rounding + (m + 2) * total(jnp.abs(gx) * outer(nd)) + (2 * n + 3) * total(jnp.abs(gx * gd))
             + 3 * ((k or 0) + 2) * (m + 2) * _U * jnp.square(t))
    return jnp.maximum(sq, 0.0) + 1.1 * _U * error


def _widened(base: jax.Array, t: jax.Array, n: int, k: int, m: int) -> jax.Array:
    """sqrt(base) plus the rounding of the batched sum, capped by T, plus the underflow allowance."""
    margin = 2 * (n + 2) * _U
    underflow = 2.0**-56 * (n + 1) * math.sqrt((k + 1) * (m + 1))
    return jnp.minimum(jnp.sqrt(base) + margin * t, t * (1 + margin)) + underflow


class _ScaledRows(NamedTuple):
    """One table's looked-up rows and output cotangents of each example, the cotangents scaled."""

    rows: jax.Array  # (B, N) int32 row read at each lookup; V where none is (an index out of range, dropped)
    d: jax.Array  # (B, N, M) D_b * 2^-e_b: entries below 4 in magnitude
    e: jax.Array  # (B,) int32


def ghost_norms(
    loss_fn: Callable[[PyTree, PyTree, jax.Array], jax.Array], params: PyTree, examples: PyTree, keys: jax.Array
) -> GhostResult:
    """Per-example losses and gradient norms of `loss_fn(params, example, key)` over a batch.

    Args:
      loss_fn: loss of ONE example (no batch axis).
      params: the differentiated parameters (leaves may be `None`, e.g. frozen ones).
      examples: pytree with leading batch axis B.
      keys: (B,) per-example PRNG keys.
    """
    leaves, treedef = jax.tree.flatten(params)
    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    row = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    closed = jax.make_jaxpr(lambda ls, ex, key: loss_fn(treedef.unflatten(ls), ex, key))(
        [spec(a) for a in leaves], jax.tree.map(row, examples), row(keys)
    )
    n_in = len(closed.jaxpr.invars)
    owners = list(range(len(leaves))) + [None] * (n_in - len(leaves))

    uses: list[_Use | _ConvUse | _Lookup] = []
    other: set[int] = set()
    _analyze(closed.jaxpr, owners, uses, other)
    layouts: dict[int, set[tuple[Any, ...]]] = {}
    for use in uses:
        layouts.setdefault(use.param, set()).add(use.layout)
    dense = {p for p, lay in layouts.items() if p not in other and len(lay) == 1}
    uses = [u for u in uses if u.param in dense]
    kinds = {u.param: u for u in uses}  # one layout per param: any of its uses describes them all
    fallback = [i for i in range(len(leaves)) if i not in dense]

    def tapped(fb_leaves, zs, example, key):
        flat = list(leaves)
        for i, leaf in zip(fallback, fb_leaves):
            flat[i] = leaf
        taps = _Taps(zs, dense)
        args = flat + jax.tree.leaves(example) + [key]
        (loss,) = _evaluate(closed.jaxpr, closed.consts, args, owners, taps)
        return loss, taps.xs

    batch = keys.shape[0]
    zs = [jnp.zeros((batch,) + ((u.layers,) if u.layers else ()) + u.out.shape, u.out.dtype) for u in uses]
    grad_fn = jax.value_and_grad(tapped, argnums=(0, 1), has_aux=True)
    (losses, xs), (fb_grads, dys) = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0))(
        [leaves[i] for i in fallback], zs, examples, keys
    )

    stacked: dict[int, tuple[jax.Array, jax.Array]] = {}
    flat_layers = lambda a: a.reshape((-1,) + a.shape[2:])  # (B, L, ...) -> (B L, ...): one row per layer
    for use, x, dy in zip(uses, xs, dys):
        xc, dc = use.canonical(*((flat_layers(x), flat_layers(dy)) if use.layers else (x, dy)))
        if use.param in stacked:
            px, pd = stacked[use.param]
            xc, dc = jnp.concatenate([px, xc], axis=1), jnp.concatenate([pd, dc], axis=1)
        stacked[use.param] = (xc, dc)
    scaled: dict[int, _Scaled | _ScaledRows] = {}
    bounds = []
    for p, (x, d) in stacked.items():
        if isinstance(kinds[p], _Lookup):
            ed = _row_exponents(d)
            s = scaled[p] = _ScaledRows(x, _scaled_rows(d, ed), ed)
            bound = _times_pow2(_lookup_norm_bound(s.rows, s.d, kinds[p].v), s.e)
        else:
            s = scaled[p] = _scale(x, d)
            bound = _times_pow2(_norm_bound(s.x, s.d), s.e)
        bounds.append(bound.reshape(batch, -1))  # (B, L): one bound per layer, added in squares by `l2_norms`
    terms = sum(b.shape[1] for b in bounds)  # squares summed: one per leaf and layer
    norms = l2_norms(bounds) * (1 + (terms + 2) * _U) if bounds else jnp.zeros((batch,), jnp.float32)

    def dense_sum(weights: jax.Array) -> PyTree:
        out: list[Any] = [None] * len(leaves)
        for p, s in scaled.items():
            layers = kinds[p].layers or 1
            rows_w = jnp.repeat(weights.astype(jnp.float32), layers)  # one weight per (example, layer) row
            keep = (rows_w != 0)[:, None, None]
            wd = jnp.where(keep, s.d * _times_pow2(rows_w, s.e)[:, None, None], 0.0)  # X^T (w D) = x^T (w 2^e d)
            if isinstance(s, _ScaledRows):  # layer l's row r is row l V + r of the stacked tables; V (none) drops
                v = kinds[p].v
                rows = jnp.where(s.rows < v, s.rows + v * (jnp.arange(s.rows.shape[0]) % layers)[:, None],
                                 v * layers)
                g = jnp.zeros((v * layers, wd.shape[2]), jnp.float32).at[rows.reshape(-1)].add(
                    wd.reshape(-1, wd.shape[2]), mode="drop")
                out[p] = g.reshape(leaves[p].shape)
                continue
            x = jnp.where(keep, s.x, 0.0)
            if kinds[p].layers:
                per_layer = lambda a: a.reshape((-1, layers) + a.shape[1:])
                g = jnp.einsum("blnk,blnm->lkm", per_layer(x), per_layer(wd), precision=_HIGHEST)
            else:
                g = jnp.einsum("bnk,bnm->km", x, wd, precision=_HIGHEST)[None]
            order = kinds[p].w_order
            layer_shape = leaves[p].shape[1:] if kinds[p].layers else leaves[p].shape
            g = g.reshape([layers, *(layer_shape[a] for a in order)])
            out[p] = jnp.transpose(g, (0, *(np.argsort(order) + 1))).reshape(leaves[p].shape)
        return treedef.unflatten(out)

    fb_tree: list[Any] = [None] * len(leaves)
    for i, g in zip(fallback, fb_grads):
        fb_tree[i] = g
    return GhostResult(losses, norms, treedef.unflatten(fb_tree), dense_sum)
