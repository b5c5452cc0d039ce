"""Routed group matmul: a projection group's `x @ W` plus each row's chosen LoRA experts, one kernel.

    y[t] = x[t] @ W + sum_s sum_j g[t,s,j] (x[t] @ A[e][:, s-th rank block]) @ B[e][:, s-th columns]

over the group's members s (placed by `members`, see `_groups.py`), e = ids[t, s, j] (s -> 0 with
one route for all members). It never writes weights: its traffic is W once plus the chosen
experts' A/B, and every row may be routed differently. The exact meaning is
`reference.routed_group_matmul_reference`.

Pallas kernel, grid (column tiles, K splits, row tiles). Column tiles are wide powers of two laid
over each member's columns separately, so a tile carries at most one member's term. A program
streams its share of K (split-K: `splits` programs per column tile, so a batch-1 call still puts
a few programs on every SM) and finds in the ids which experts its rows picked for its member;
each of those experts' A/B is read once, in place, by the program (no gather outside), and the
experts nobody picked are never read.

* GEMV form (few rows, default up to GEMV_MAX_ROWS): broadcast multiply into a [rows, bk, bn]
  fp32 accumulator, reduced once after the loop, so the hot loop is loads and FMAs with no
  cross-thread reduction and no 16-row padded `dot`.
* dot form (more rows): tensor-core dots over [bt, bk] x [bk, bn] tiles.

x @ A comes in one of two ways (`xa`). "fused", the default while T*k < E (decode): the chosen
experts' A slices ride in the program's own K loop beside W (the GEMV form shares the x tile;
the dot form loops over the chosen experts after W), costing each program about k*r/bn of its W
reads, mostly from L2. "dense", the default once most experts are in play: every column tile
would otherwise redo x @ A for nearly all E experts, so one XLA dot computes it for all experts
before the kernel ([T, E, S*r] fp32, a few % of W's bytes), and split 0 of each column tile
applies (coef * xA) @ B. Either way B is read once per program that adds the term.

Split-K partial sums are combined either as fp32 partials summed by one XLA reduction after the
kernel (`reduction="partials"`, deterministic, one extra small kernel) or by `atomic_add` into a
zeroed fp32 output (`reduction="atomic"`: a memset and a cast around the kernel; the summation
order varies from run to run, so results may differ in the last fp32 bits).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as C
from ._groups import column_tiling, max_width, normalize_members

__all__ = ["routed_group_matmul"]

_F32 = jnp.float32
GEMV_MAX_ROWS = 8  # beyond ~8 rows the broadcast form's FMAs per weight byte approach the SM's FP32 rate
TARGET_PROGRAMS = 396  # ~3 resident programs per SM of a 132-SM H100: enough loads in flight per SM
MAX_SPLITS = 32
ACC_REGS = 64  # fp32 accumulator registers per thread the GEMV form's default tiles aim at
REDUCTIONS = ("partials", "atomic")
XA_FORMS = ("fused", "dense")


# ----------------------------------------------------------------------------- checks


def _check(x, W, A, B, ids, gates, members, layer):
    """Shapes, dtypes, members and routes; returns the normalized members."""
    stacked = layer is not None
    lead, lay = (1, "[L, ") if stacked else (0, "[")
    C.check_ndim("x", x, 2, "[T, K]")
    C.check_ndim("W", W, 2, "[K, N] (one layer's group weight)")
    C.check_ndim("A", A, 3 + lead, lay + "E, K, S*r]")
    C.check_ndim("B", B, 3 + lead, lay + "E, r, Nb]")
    C.check_float("x", x)
    C.check_same_dtype("x", x, W=W)
    C.check_experts(A, B)
    T, K = x.shape
    C.check_dim("W", W, 0, K, "K, columns of x")
    C.check_dim("A", A, lead + 1, K, "K, columns of x")
    members = normalize_members(members, W.shape[1], B.shape[-1])
    S, E = len(members), A.shape[lead]
    if A.shape[-1] % S:
        raise ValueError(f"A has shape {tuple(A.shape)}; expected its last dim to be S*r for the S={S} members")
    r = A.shape[-1] // S
    if stacked:
        C.check_dim("B", B, 0, A.shape[0], "L, layers of A")
    C.check_dim("B", B, lead, E, "E, experts of A")
    C.check_dim("B", B, lead + 1, r, f"r = {A.shape[-1]} rank columns of A / {S} members")
    C.check_ndim("ids", ids, 3, "[T, S_r, k]")
    if ids.shape[0] != T or ids.shape[1] not in (1, S):
        raise ValueError(f"ids has shape {tuple(ids.shape)}; expected [T={T}, S_r, k] with S_r = 1 (one route "
                         f"for all members) or S_r = {S} (one route per member)")
    C.check_routing("ids", ids, "gates", gates, tuple(ids.shape), E)
    if stacked:
        if not jnp.issubdtype(jnp.result_type(layer), jnp.integer) or jnp.ndim(layer) != 0:
            raise ValueError(f"layer={layer!r} must be an integer scalar (index into the stacked axis of A/B)")
        value = C.concrete(layer)
        if value is not None and not 0 <= int(value) < A.shape[0]:
            raise ValueError(f"layer={int(value)} is out of range; expected [0, {A.shape[0]})")
    return members


# ----------------------------------------------------------------------------- pallas


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static shape of one kernel launch (all tiles powers of two)."""

    T: int
    K: int
    E: int
    r: int
    k: int
    S_r: int
    gemv: bool
    bt: int  # rows per program
    bk: int  # K per loop step
    bn: int  # columns per program
    br: int  # rank, padded
    split_steps: int  # K steps per program
    splits: int
    mode: str  # "single" (no split), "partials" or "atomic"
    xa: str  # "fused" (x @ A inside the kernel) or "dense" (given: one XLA dot over all experts)
    slots: int  # distinct experts a program may need: min(bt * k, E)
    acc3_a: bool  # GEMV: keep x @ A unreduced across the loop too (when it is small)
    num_warps: int
    num_stages: int


def _configure(T, K, N, E, r, k, S_r, members, *, gemv=None, xa=None, block_t=None, block_k=None, block_n=None,
               splits=None, reduction=None, num_warps=None, num_stages=None) -> tuple[_Config, object]:
    """Knobs -> a static config and the column tiling; None picks the default reasoned below."""
    for name, v in (("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None:
            C.check_positive_int(name, v)
    if gemv not in (None, True, False):
        raise ValueError(f"gemv={gemv!r} must be True, False or None (auto: up to {GEMV_MAX_ROWS} rows)")
    if reduction not in (None, *REDUCTIONS):
        raise ValueError(f"reduction={reduction!r} is unknown; expected one of {REDUCTIONS} or None")
    if xa not in (None, *XA_FORMS):
        raise ValueError(f"xa={xa!r} is unknown; expected one of {XA_FORMS} or None (auto: fused while T*k < E)")
    if splits is not None:
        C.check_positive_int("splits", splits)
    gemv = T <= GEMV_MAX_ROWS if gemv is None else gemv
    widest = max_width(members, N)
    if gemv:
        # A batch-1 call reads W once: wide tiles give long contiguous row reads (512 B in bf16), and
        # the [bt, bk, bn] accumulator is sized to ~ACC_REGS registers per thread. More rows narrow
        # the tile so the (coef * xA) @ B broadcast stays in registers too.
        bt = C.tile(T, block_t, 16, "block_t", minimum=1)
        warps = num_warps or (4 if bt <= 2 else 8)
        bn = C.tile(widest, block_n, 256 if bt <= 2 else 128, "block_n", minimum=1)
        fit = C.prev_pow2(max(1, ACC_REGS * 32 * warps // (bt * bn)))
        bk = C.tile(K, block_k, min(fit, 256), "block_k", minimum=1)
        br = C.next_pow2(r)
    else:
        bt = C.tile(T, block_t, 64, "block_t")
        warps = num_warps or 4
        bn = C.tile(widest, block_n, 128, "block_n")
        bk = C.tile(K, block_k, 64, "block_k")
        br = C.tile(r, None, C.next_pow2(r), "rank")
    tiling = column_tiling(members, N, bn)
    steps = pl.cdiv(K, bk)
    if splits is None:  # enough programs to keep every SM streaming; each split adds fp32 partials
        splits = max(1, min(MAX_SPLITS, round(TARGET_PROGRAMS / (tiling.tiles * pl.cdiv(T, bt)))))
    splits = min(splits, steps)
    split_steps = pl.cdiv(steps, splits)
    splits = pl.cdiv(steps, split_steps)
    slots = min(bt * k, E)
    # Few experts in play: each program reads their A slices in its own loop (k*r/bn of its W tile).
    # Once most experts are in play, every column tile would redo x @ A for nearly all of them
    # (E*r/bn of its W tile, and as many FMAs): one XLA dot over all experts does it once.
    xa = xa or ("fused" if T * k < E else "dense")
    cfg = _Config(
        T=T, K=K, E=E, r=r, k=k, S_r=S_r, gemv=gemv, bt=bt, bk=bk, bn=bn, br=br, split_steps=split_steps,
        splits=splits, mode="single" if splits == 1 else (reduction or "partials"), xa=xa, slots=slots,
        acc3_a=slots * bt * bk * br <= 16 * 32 * warps, num_warps=warps, num_stages=num_stages or 3,
    )
    return cfg, tiling


def _routes(cfg, ids_ref, gates_ref, rows_at, row_ok, route, lora):
    """The experts this program's rows picked for its member's route: their count, and `expert(u)`
    giving the u-th of them (ascending) with each row's summed gate for it. Experts are counted in
    an [E] vector (no cumsum or reduce_or needed), so this is a little scalar and vector work."""
    ids, gates = [], []
    for j in range(cfg.k):
        slot = jnp.int32(j)  # traced scalar: interpret mode rejects Python ints here
        ids.append(C.load(ids_ref.at[rows_at, route, slot], row_ok, 0))
        gates.append(C.load(gates_ref.at[rows_at, route, slot], row_ok, 0.0))
    experts = jnp.arange(C.next_pow2(cfg.E), dtype=jnp.int32)
    hits = sum(jnp.sum(((i[:, None] == experts[None, :]) & row_ok[:, None]).astype(jnp.int32), axis=0) for i in ids)
    used = (hits > 0) & lora  # Triton has no reduce_or: count the hits instead
    before = jnp.sum((used[None, :] & (experts[None, :] < experts[:, None])).astype(jnp.int32), axis=1)
    count = jnp.sum(used.astype(jnp.int32))

    def expert(u):
        """The u-th used expert (ascending) and each row's summed gate for it."""
        e = jnp.sum(jnp.where(used & (before == u), experts, 0))
        coef = sum(jnp.where(i == e, g, 0.0) for i, g in zip(ids, gates))
        return e, coef

    return count, expert


def _kernel(layer_ref, ids_ref, gates_ref, x_ref, w_ref, a_ref, b_ref, *refs, cfg, tiling, members):
    xa_ref = refs[0] if cfg.xa == "dense" else None
    o_ref = refs[-1]
    j, part, ti = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lay = layer_ref[0]
    seg = tiling.segment(j, members, cfg.S_r)
    bt, bk, bn, br = cfg.bt, cfg.bk, cfg.bn, cfg.br
    rows_at = pl.ds(ti * bt, bt)
    row_ok = ti * bt + jnp.arange(bt) < cfg.T
    col_ok = seg["col0"] + jnp.arange(bn) < seg["end"]
    rank_ok = jnp.arange(br) < cfg.r
    rank_at = pl.ds(seg["member"] * cfg.r, br)
    k_first = part * cfg.split_steps * bk
    fused = cfg.xa == "fused"
    # With x @ A given (dense), the whole routed term is added once per column tile, by split 0.
    term_ok = True if fused else part == 0

    def routes():  # only the fused GEMV loop needs them before W: elsewhere W's loads go first
        return _routes(cfg, ids_ref, gates_ref, rows_at, row_ok, seg["route"], seg["lora"])

    def x_tile(k_at):
        k_ok = k_at + jnp.arange(bk) < cfg.K
        return C.load(x_ref.at[rows_at, pl.ds(k_at, bk)], row_ok[:, None] & k_ok[None, :]), k_ok

    def w_tile(k_at, k_ok):
        return C.load(w_ref.at[pl.ds(k_at, bk), pl.ds(seg["col0"], bn)], k_ok[:, None] & col_ok[None, :],
                      eviction_policy="evict_first")

    def a_tile(e, k_at, k_ok, ok):
        return C.load(a_ref.at[lay, e, pl.ds(k_at, bk), rank_at], ok & k_ok[:, None] & rank_ok[None, :])

    def b_tile(e, ok):
        return C.load(b_ref.at[lay, e, pl.ds(0, br), pl.ds(seg["bcol0"], bn)], ok & rank_ok[:, None] & col_ok[None, :])

    def given_xa(e, ok):  # [bt, br] f32: the rows' x @ A[e] for this member, computed before the kernel
        return C.load(xa_ref.at[rows_at, e, rank_at], ok & row_ok[:, None] & rank_ok[None, :])

    if cfg.gemv:
        def chosen():  # [(expert, each row's gate for it)], [whether that slot holds an expert]
            count, expert = routes()
            return ([expert(jnp.int32(u)) for u in range(cfg.slots)],
                    [(jnp.int32(u) < count) & term_ok for u in range(cfg.slots)])

        slots, live = chosen() if fused else ([], [])

        def step(i, carry):
            acc, xas = carry
            k_at = k_first + i * bk
            x, k_ok = x_tile(k_at)
            x = x.astype(_F32)[:, :, None]
            acc = acc + x * w_tile(k_at, k_ok).astype(_F32)[None]
            new = []
            for (e, _), ok, xa in zip(slots, live, xas):
                prod = x * a_tile(e, k_at, k_ok, ok).astype(_F32)[None]
                new.append(xa + (prod if cfg.acc3_a else jnp.sum(prod, axis=1)))
            return acc, tuple(new)

        xa_shape = (bt, bk, br) if cfg.acc3_a else (bt, br)
        xas = tuple(jnp.zeros(xa_shape, _F32) for _ in slots) if fused else ()
        acc, xas = jax.lax.fori_loop(0, cfg.split_steps, step, (jnp.zeros((bt, bk, bn), _F32), xas))

        def add_terms(acc):
            for u, ((e, coef), ok) in enumerate(zip(*((slots, live) if fused else chosen()))):
                if fused:
                    xa = jnp.sum(xas[u], axis=1) if cfg.acc3_a else xas[u]
                else:
                    xa = given_xa(e, ok)
                b = b_tile(e, ok).astype(_F32)
                acc = acc + jnp.sum((coef[:, None] * xa)[:, :, None] * b[None], axis=1)
            return acc

        acc = jnp.sum(acc, axis=1)
        acc = add_terms(acc) if fused else jax.lax.cond(term_ok, add_terms, lambda acc: acc, acc)
    else:
        def step(i, acc):
            k_at = k_first + i * bk
            x, k_ok = x_tile(k_at)
            return acc + C.dot(x, w_tile(k_at, k_ok))

        acc = jax.lax.fori_loop(0, cfg.split_steps, step, jnp.zeros((bt, bn), _F32))
        count, expert = routes()

        def add_expert(u, acc):  # (x @ A) @ B is linear in x: each K share adds its own part
            e, coef = expert(u)
            if fused:
                def a_step(i, xa):
                    k_at = k_first + i * bk
                    x, k_ok = x_tile(k_at)
                    return xa + C.dot(x, a_tile(e, k_at, k_ok, True).astype(x.dtype))

                xa = jax.lax.fori_loop(0, cfg.split_steps, a_step, jnp.zeros((bt, br), _F32))
            else:
                xa = given_xa(e, True)
            return acc + C.dot(coef[:, None] * xa, b_tile(e, True).astype(_F32))

        acc = jax.lax.fori_loop(0, jnp.where(term_ok, count, 0), add_expert, acc)

    mask = row_ok[:, None] & col_ok[None, :]
    if cfg.mode == "atomic":  # padded fp32 output: every tile's slice is in bounds, masked lanes add 0
        C.pltriton.atomic_add(o_ref, (rows_at, pl.ds(seg["col0"], bn)), jnp.where(mask, acc, 0.0))
    elif cfg.mode == "partials":
        C.store(o_ref.at[part, rows_at, pl.ds(seg["col0"], bn)], acc, mask)
    else:
        C.store(o_ref.at[rows_at, pl.ds(seg["col0"], bn)], acc.astype(o_ref.dtype), mask)


def _pallas(x, W, A, B, ids, gates, layer, members, *, interpret, **knobs):
    T, K = x.shape
    N = W.shape[1]
    _, E, _, Sr = A.shape
    S_r, k = ids.shape[1:]
    cfg, tiling = _configure(T, K, N, E, Sr // len(members), k, S_r, members, **knobs)
    kernel = functools.partial(_kernel, cfg=cfg, tiling=tiling, members=members)
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, A.shape[0] - 1)
    args = [layer.reshape(1), jnp.clip(ids.astype(jnp.int32), 0, E - 1), gates.astype(_F32), x, W, A, B]
    if cfg.xa == "dense":  # x @ A for every expert and member in one XLA dot: [T, E, S*r] f32
        prec = jax.lax.Precision.HIGHEST if x.dtype == _F32 else None
        args.append(jnp.einsum("tk,ekc->tec", x, A[layer], precision=prec, preferred_element_type=_F32))
    row_tiles = pl.cdiv(T, cfg.bt)
    aliases = {}
    if cfg.mode == "atomic":
        out = jax.ShapeDtypeStruct((row_tiles * cfg.bt, tiling.padded_width), _F32)
        args.append(jnp.zeros(out.shape, _F32))
        aliases = {len(args) - 1: 0}
    elif cfg.mode == "partials":
        out = jax.ShapeDtypeStruct((cfg.splits, T, N), _F32)
    else:
        out = jax.ShapeDtypeStruct((T, N), x.dtype)
    y = pl.pallas_call(
        kernel,
        out_shape=out,
        grid=(tiling.tiles, cfg.splits, row_tiles),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=C.compiler_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="routed_group_matmul",
    )(*args)
    if cfg.mode == "atomic":
        return y[:T, :N].astype(x.dtype)
    if cfg.mode == "partials":
        return y.sum(0).astype(x.dtype)
    return y


# ----------------------------------------------------------------------------- xla


def _xla(x, W, A, B, ids, gates, members, layer=None, form="auto"):
    """The same sum as one XLA expression, fp32 accumulation. Gathers each row's chosen experts while
    that is the smaller read (T*k < E, e.g. decode); from E/k rows on, one dense pass over all E
    experts' low-rank factors weighted by a [T, S_r, E] gate matrix beats T*k gathered copies.
    `form` ("gather"/"dense") forces one, for benchmarks and tests."""
    T, N = x.shape[0], W.shape[1]
    S_r, k = ids.shape[1:]
    S = len(members)
    r = A.shape[-1] // S
    E = A.shape[-3]
    prec = jax.lax.Precision.HIGHEST if x.dtype == _F32 else None
    dot = functools.partial(jnp.einsum, precision=prec, preferred_element_type=_F32)
    at = () if layer is None else (layer,)
    g = gates.astype(_F32)
    y = dot("tk,kn->tn", x, W)
    terms = {}
    if form == "gather" or (form == "auto" and T * k < E):
        if S_r == 1:  # one gather of the chosen experts serves every member
            xa = dot("tk,tjkc->tjc", x, A[(*at, ids[:, 0])]) * g[:, 0, :, None]
            b = B[(*at, ids[:, 0])].astype(_F32)
        for s, (w_off, b_off, width) in enumerate(members):
            if S_r == 1:
                xa_s, b_s = xa[..., s * r:(s + 1) * r], b[..., b_off:b_off + width]
            else:
                xa_s = dot("tk,tjkr->tjr", x, A[(*at, ids[:, s], slice(None), slice(s * r, (s + 1) * r))])
                xa_s = xa_s * g[:, s, :, None]
                b_s = B[(*at, ids[:, s], slice(None), slice(b_off, b_off + width))].astype(_F32)
            terms[s] = dot("tjr,tjrw->tw", xa_s, b_s)
    else:
        A, B = (A, B) if layer is None else (A[layer], B[layer])
        coef = jnp.zeros((T, S_r, E), _F32).at[jnp.arange(T)[:, None, None], jnp.arange(S_r)[None, :, None], ids].add(g)
        xa = dot("tk,ekc->tec", x, A)
        for s, (w_off, b_off, width) in enumerate(members):
            xa_s = xa[..., s * r:(s + 1) * r] * coef[:, s if S_r > 1 else 0, :, None]
            terms[s] = dot("ter,erw->tw", xa_s, B[:, :, b_off:b_off + width].astype(_F32))
    pieces, at_col = [], 0
    for s in sorted(terms, key=lambda s: members[s][0]):
        w_off, _, width = members[s]
        if w_off > at_col:
            pieces.append(jnp.zeros((T, w_off - at_col), _F32))
        pieces.append(terms[s])
        at_col = w_off + width
    if at_col < N:
        pieces.append(jnp.zeros((T, N - at_col), _F32))
    delta = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
    return (y + delta).astype(x.dtype)


# ----------------------------------------------------------------------------- public


def routed_group_matmul(
    x, W, A, B, ids, gates, *, members, layer=None, implementation=None, interpret=None,
    gemv=None, xa=None, block_t=None, block_k=None, block_n=None, splits=None, reduction=None, num_warps=None,
    num_stages=None,
):
    """y = x @ W + each row's routed LoRA experts for every member of the group; x's dtype, fp32 sums.

    x [T, K]; W [K, N] (one layer's group weight: members side by side), of x's dtype; A [E, K, S*r]
    and B [E, r, Nb] of one float dtype, which may be another (bfloat16 experts beside float32
    weights: widened as read), or [L, E, ...] with `layer` (int, may be traced: indexed inside the kernel, so a
    loop over layers never slices the stacked experts); ids / gates [T, S_r, k], S_r = 1 (one route
    for all members) or S; gates include the LoRA scale. members: S static (w_off, b_off, width)
    triples (`reference.whole_output(N)` for a single projection).

    implementation: "pallas", "xla" or None (pallas on GPU, else xla). interpret: run Pallas
    interpreted (default: True off GPU). Pallas-only tuning knobs (None = the default for the shape):
    gemv (broadcast form instead of dots; default for T <= GEMV_MAX_ROWS), xa ("fused": x @ A of
    the chosen experts inside the kernel, default while T*k < E; "dense": one XLA dot over all
    experts first), block_t / block_k / block_n (power-of-two rows, K step and columns per
    program), splits (programs sharing a column tile's K), reduction ("partials" or "atomic", how
    split-K sums meet), num_warps, num_stages.
    """
    members = _check(x, W, A, B, ids, gates, members, layer)
    impl = C.resolve_implementation(implementation)
    if impl == "xla":
        return _xla(x, W, A, B, ids, gates, members, layer)
    if layer is None:  # a free leading axis lets one kernel serve both forms
        A, B, layer = A[None], B[None], 0
    return _pallas(
        x, W, A, B, ids, gates, layer, members, interpret=C.resolve_interpret(interpret), gemv=gemv, xa=xa,
        block_t=block_t, block_k=block_k, block_n=block_n, splits=splits, reduction=reduction,
        num_warps=num_warps, num_stages=num_stages,
    )
