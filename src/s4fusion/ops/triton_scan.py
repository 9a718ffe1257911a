"""Triton GPU backend of the SS2D / Cross SS2D scan core (``cross_scan``).

Same signature, layouts and semantics as
:func:`s4fusion.ops.reference.cross_scan_ref` (the specification), with gradients
of every tensor input. Inputs in float32, bfloat16 or float16, any strides; the
recurrent state and every accumulation are float32; the output and the gradients
come back in their tensor's dtype.

Algorithm (no copy of the inputs is made: direction unfolding, modality
interleaving and the recovery sum are index arithmetic inside the kernels):

* The scan sequence of direction k is cut into chunks: every image line (rows
  for k = 0, 2, columns for k = 1, 3, each visited in scan order) is cut into
  segments of ``SEG`` steps (``SEG`` is chosen at run time so that there is
  enough parallel work). Token t of a line is modality ``t % M`` at step
  ``t // M`` (infrared first); step i of line j sits at row-major position
  ``base_k + j * line_step_k + i * pos_step_k``.
* Forward pass 1 (``_fwd_kernel``, ``WITH_Y=False``): every chunk from a zero
  state, all in parallel: the chunk's end state and its sum of steps dt.
* Pass 2 (``_chunk_combine_kernel``): a scan over the chunks of each direction
  gives every chunk its true start state (a chunk decays a state by
  ``exp(A * sum dt)``).
* Pass 3 (``_fwd_kernel``, ``WITH_Y=True``): every chunk again from its start
  state; ``y = C.h + D u`` is added atomically (float32) at its row-major
  position, so the K directions sum in place.
* Backward: ``_bwd_sweep_kernel`` walks every chunk from its start state and
  stores the state entering each block of ``TB`` steps, and the adjoint the
  chunk passes to the state before it; ``_chunk_combine_kernel`` (reversed)
  gives every chunk the adjoint arriving from the chunks after it;
  ``_bwd_kernel`` walks the blocks of every chunk backwards, recomputes each
  block's states from the stored one and accumulates all gradients (B, C and u
  atomically over channel blocks and directions; A, D and delta_bias as
  per-program partial sums).

Work layout of the forward kernel: a program owns ``E`` lanes of one segment of
one direction and batch element; a lane is one line and ``CB`` neighbouring
channels, with the ``N`` states of each channel in registers (``N`` is a
compile-time constant). Lanes of one line are neighbours, so at every step a
warp reads the channels of a few positions: coalesced for every direction when
the channels are innermost in memory, the layout the network passes (and
outputs: the result has the input's layout). B and C are read once per line and
step and shared by the line's lanes.

Work layout of the backward kernels: a program owns one segment of ``G = 32 *
num_warps`` lines (one line per thread) of one direction and batch element, and
``CB`` channels (inside the thread); it loops over the blocks of its segment and,
per block, over the state index n (loads for n + 1 are issued before the work on
n); the ``TB * M`` tokens of a block are unrolled (``tl.static_range`` and
tuples), so the recurrence runs sequentially in registers. Each pass is launched
once for the row directions and once for the column directions (``ROWS``): along
columns neighbouring threads read neighbouring positions already; along rows the
block is read and written as coalesced (lines, TB) tiles and transposed in
registers (one shared-memory exchange). These kernels read along positions, so
the backward first makes position-innermost copies of inputs that have their
channels innermost.

``H``, ``W``, ``SEG`` and the size-dependent strides are runtime values that are
not specialised on: one compiled kernel per dtype, M, N and block shape serves
every image size.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from .reference import check_cross_scan_args

__all__ = ["cross_scan_triton"]

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
# One-instruction exp2 (results below 2**-126 flush to zero); the Triton
# interpreter (TRITON_INTERPRET=1, used to check the kernels on a CPU) has no
# inline PTX and uses tl.exp2.
FAST_EXP2 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")

# Launch configuration.
# Forward: lanes (one line x FWD_CB neighbouring channels each) per program, tokens
# unrolled per loop iteration, lanes wanted per launch (lines are cut into segments
# until there are about as many).
FWD_CB, FWD_LANES, FWD_UNROLL = 2, 128, 2
TARGET_LANES = 1 << 17
# Backward: lines per program = 32 * NUM_WARPS (one per thread); channels per
# thread; scan steps per unrolled block for M = 1 (halved for M = 2).
NUM_WARPS = 1
BWD_CB, BWD_STEPS = 2, 8
# Chunk combine: chunk slots per scan block, states per program, warps.
COMBINE_ROWS, COMBINE_STATES, COMBINE_WARPS = 64, 32, 4

_SIZES = ["H", "W", "N", "NL", "NS", "SEG", "NBLK", "GRID0"]
_STRIDES = [
    "su_b", "su_m", "su_c", "sd_b", "sd_m", "sd_k", "sd_c", "sb_b", "sb_m", "sb_k", "sb_n",
    "sc_b", "sc_m", "sc_k", "sc_n", "sg_b", "sg_m", "sg_c", "so_b", "so_m", "so_c",
]  # fmt: skip


# ---------------------------------------------------------------------- helpers


def _scan_jit(fn):
    """triton.jit without specialisation on sizes, size-dependent strides and pointer
    alignment (every access is a gather, so they would only multiply compilations)."""
    params = inspect.signature(fn).parameters
    names = [a for a, p in params.items() if p.annotation != "tl.constexpr"]  # (annotations are strings here)
    fixed = [a for a in names if a in _SIZES or a in _STRIDES or a == "d" or a.endswith("_ptr")]
    return triton.jit(do_not_specialize=fixed)(fn)


@triton.jit
def _exp2(x):
    if FAST_EXP2:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20) in float32."""
    e = tl.exp(tl.minimum(x, 20.0))
    z = 1.0 + e
    # log1p(e) to full precision: log(z) * e / (z - 1), and e where z rounds to 1
    lp = tl.where(z == 1.0, e, tl.log(z) * (e / (z - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _geometry(k, H, W):
    """Direction k's lines: (number of lines, line length, position of line 0 step 0,
    position step between lines, position step along a line)."""
    is_col = k % 2
    rev = k // 2
    nlines = H + is_col * (W - H)
    llen = W + is_col * (H - W)
    sign = 1 - 2 * rev
    line_step = (W + is_col * (1 - W)) * sign
    pos_step = (1 + is_col * (W - 1)) * sign
    base = rev * (H * W - 1)
    return nlines, llen, base, line_step, pos_step


@triton.jit
def _combine(a1, b1, a2, b2):
    """Composition of two affine maps h -> a h + b (first, then second)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _halves(x):
    """(R, G, T) -> its first and second halves along the last axis, (R, G, T/2) each."""
    return tl.split(tl.permute(tl.reshape(x, [x.shape[0], x.shape[1], 2, x.shape[2] // 2]), [0, 1, 3, 2]))


@triton.jit
def _pair(a, b):
    """Inverse of _halves: two (R, G, T) -> (R, G, 2T), ``a`` first."""
    return tl.reshape(tl.permute(tl.join(a, b), [0, 1, 3, 2]), [a.shape[0], a.shape[1], 2 * a.shape[2]])


@triton.jit
def _unstack(x, TB: tl.constexpr):
    """(R, G, TB) -> tuple of the TB (R, G) slices, in order (TB a power of two <= 16).
    Compiles to one shared-memory transpose."""
    parts = tl.tuple([x])
    for lvl in tl.static_range(4):
        if (1 << lvl) < TB:
            nxt = tl.tuple([])
            for i in tl.static_range(1 << lvl):
                nxt = nxt + _halves(parts[i])
            parts = nxt
    out = tl.tuple([])
    for i in tl.static_range(TB):
        out = out + (tl.reshape(parts[i], [x.shape[0], x.shape[1]]),)
    return out


@triton.jit
def _stack(T, m: tl.constexpr, M: tl.constexpr, TB: tl.constexpr):
    """(R, G, TB) tile of the tokens ``T[s * M + m]`` (each (R, G)), s = 0 .. TB-1."""
    parts = tl.tuple([])
    for s in tl.static_range(TB):
        parts = parts + (tl.reshape(T[s * M + m], [T[0].shape[0], T[0].shape[1], 1]),)
    for lvl in tl.static_range(4):
        if (TB >> lvl) > 1:
            nxt = tl.tuple([])
            for i in tl.static_range(TB >> (lvl + 1)):
                nxt = nxt + (_pair(parts[2 * i], parts[2 * i + 1]),)
            parts = nxt
    return parts[0]


@triton.jit
def _block(i0, line_off, lmask, llen, pos_step, M: tl.constexpr, TB: tl.constexpr):
    """Positions and validity of the block of TB steps starting at step i0: per token
    ((G,) each, token order (step, modality)) and as (G, TB) tiles."""
    P = tl.tuple([])
    V = tl.tuple([])
    for s in tl.static_range(TB):
        for m in tl.static_range(M):
            P = P + (line_off + (i0 + s) * pos_step,)
            V = V + (lmask & (i0 + s < llen),)
    steps = i0 + tl.arange(0, TB)
    pos2 = line_off[:, None] + steps[None, :] * pos_step
    ok2 = lmask[:, None] & (steps < llen)[None, :]
    return P, V, pos2, ok2


@triton.jit
def _tokens(ptr, stride_m, stride_l, rmask, P, V, pos2, ok2, M: tl.constexpr, TB: tl.constexpr, ROWS: tl.constexpr):
    """The block's tokens of a (.., M, .., L) tensor as TB*M float32 (R, G) tiles in
    token order; ``ptr`` (R, 1) points at position 0 of modality 0, ``rmask`` (R,).
    Row lines: M coalesced (R, G, TB) loads (a warp reads along the rows), split in
    registers; column lines: one load per token (a warp reads along a row already)."""
    X = tl.tuple([])
    if ROWS:
        PM = tl.tuple([])
        for m in tl.static_range(M):
            msk = rmask[:, None, None] & ok2[None, :, :]
            x = tl.load(ptr[:, :, None] + m * stride_m + pos2[None, :, :] * stride_l, mask=msk, other=0.0)
            PM = PM + (_unstack(x.to(tl.float32), TB),)
        for s in tl.static_range(TB):
            for m in tl.static_range(M):
                X = X + (PM[m][s],)
    else:
        for s in tl.static_range(TB):
            for m in tl.static_range(M):
                msk = rmask[:, None] & V[s * M + m][None, :]
                x = tl.load(ptr + m * stride_m + P[s * M + m][None, :] * stride_l, mask=msk, other=0.0)
                X = X + (x.to(tl.float32),)
    return X


@triton.jit
def _put(ptr, stride_m, rmask, T, P, V, pos2, ok2, M: tl.constexpr, TB: tl.constexpr, ROWS: tl.constexpr,
         ATOMIC: tl.constexpr):  # fmt: skip
    """Store (or atomically add) the block's tokens T (TB*M (R, G) tiles) into a
    (.., M, .., L) tensor with unit position stride; ``ptr`` (R, 1) as in _tokens."""
    if ROWS:
        for m in tl.static_range(M):
            msk = rmask[:, None, None] & ok2[None, :, :]
            p = ptr[:, :, None] + m * stride_m + pos2[None, :, :]
            if ATOMIC:
                tl.atomic_add(p, _stack(T, m, M, TB), mask=msk, sem="relaxed")
            else:
                tl.store(p, _stack(T, m, M, TB), mask=msk)
    else:
        for s in tl.static_range(TB):
            for m in tl.static_range(M):
                msk = rmask[:, None] & V[s * M + m][None, :]
                p = ptr + m * stride_m + P[s * M + m][None, :]
                if ATOMIC:
                    tl.atomic_add(p, T[s * M + m], mask=msk, sem="relaxed")
                else:
                    tl.store(p, T[s * M + m], mask=msk)


@triton.jit
def _chunk(pid0, pid_bk, NL, NS, SEG, H, W, K: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr):
    """The program's batch element, direction (row directions 0, 2 or column
    directions 1, 3), lines and segment: (bi, k, bk = bi * K + k, j, lmask, line_off,
    llen, pos_step, first step, end step (= first step when the program has no work),
    chunk slot row (1, G))."""
    if ROWS:
        KC: tl.constexpr = (K + 1) // 2
        ODD: tl.constexpr = 0
    else:
        KC: tl.constexpr = K // 2
        ODD: tl.constexpr = 1
    bi = pid_bk // KC
    k = 2 * (pid_bk % KC) + ODD
    bk = bi * K + k
    lg = pid0 // NS
    sg = pid0 % NS
    nlines, llen, base, line_step, pos_step = _geometry(k, H, W)
    j = lg * G + tl.arange(0, G)
    lmask = j < nlines
    line_off = base + j * line_step
    lo = sg * SEG
    active = (lg * G < nlines) & (lo < llen)
    hi = tl.where(active, tl.minimum(lo + SEG, llen), lo)  # end of the segment, = lo when idle
    row = (bk.to(tl.int64) * NL + j[None, :]) * NS + sg
    return bi.to(tl.int64), k, bk, j, lmask, line_off, llen, pos_step, lo, hi, row


# ---------------------------------------------------------------------- forward


@_scan_jit
def _fwd_kernel(
    u_ptr, dl_ptr, a2_ptr, b_ptr, c_ptr, dsk_ptr, bias_ptr,
    st_ptr,  # (b*K, NL, NS, d, N) f32: pass 1 writes chunk-local end states; pass 3 reads start states
    dts_ptr,  # (b*K, NL, NS, d) f32: pass 1 writes the chunk sums of dt
    out_ptr,  # (b, M, d, L) f32, zeroed, any strides: pass 3 adds y
    H, W, NL, NS, SEG, d,
    su_b, su_m, su_c, su_l,
    sd_b, sd_m, sd_k, sd_c, sd_l,
    sb_b, sb_m, sb_k, sb_n, sb_l,
    sc_b, sc_m, sc_k, sc_n, sc_l,
    so_b, so_m, so_c, so_l,
    K: tl.constexpr, M: tl.constexpr, N: tl.constexpr, CB: tl.constexpr, E: tl.constexpr, TB: tl.constexpr,
    WITH_Y: tl.constexpr,
):  # fmt: skip
    """One chunk (a segment of SEG steps of a line) of E (line, channel group) lanes;
    lane = one line x CB neighbouring channels, the N states of each in registers."""
    pid0 = tl.program_id(0)
    pid_bk = tl.program_id(1)
    bi = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    nq = (d + CB - 1) // CB  # channel groups per line
    sg = pid0 % NS
    f = (pid0 // NS) * E + tl.arange(0, E)
    j = f // nq
    c0 = (f % nq) * CB
    nlines, llen, base, line_step, pos_step = _geometry(k, H, W)
    lmask = j < nlines
    line_off = (base + j * line_step).to(tl.int64)
    lo = sg * SEG
    hi = tl.minimum(lo + SEG, llen)
    row = (pid_bk.to(tl.int64) * NL + j) * NS + sg
    # per channel e of the lane: mask, pointers, bias, skip, A * log2(e) per state (index n * CB + e)
    CM = tl.tuple([])
    UP = tl.tuple([])
    DP = tl.tuple([])
    OP = tl.tuple([])
    BIAS = tl.tuple([])
    DSK = tl.tuple([])
    for e in tl.static_range(CB):
        c = c0 + e
        cm = lmask & (c < d)
        CM = CM + (cm,)
        UP = UP + (u_ptr + bi * su_b + c * su_c,)
        DP = DP + (dl_ptr + bi * sd_b + k * sd_k + c * sd_c,)
        OP = OP + (out_ptr + bi * so_b + c * so_c,)
        BIAS = BIAS + (tl.load(bias_ptr + k * d + c, mask=cm, other=0.0),)
        DSK = DSK + (tl.load(dsk_ptr + k * d + c, mask=cm, other=0.0),)
    A2 = tl.tuple([])
    Hs = tl.tuple([])
    for n in tl.static_range(N):
        for e in tl.static_range(CB):
            c = c0 + e
            A2 = A2 + (tl.load(a2_ptr + (k * d + c) * N + n, mask=CM[e], other=0.0),)
            if WITH_Y:
                Hs = Hs + (tl.load(st_ptr + (row * d + c) * N + n, mask=CM[e], other=0.0),)
            else:
                Hs = Hs + (tl.zeros([E], tl.float32),)
    DTS = tl.tuple([])
    for e in tl.static_range(CB):
        DTS = DTS + (tl.zeros([E], tl.float32),)
    b_base = b_ptr + bi * sb_b + k * sb_k
    c_base = c_ptr + bi * sc_b + k * sc_k
    for i0 in range(lo, hi, TB):
        for s in tl.static_range(TB):
            v = lmask & (i0 + s < hi)
            p = line_off + (i0 + s) * pos_step
            for m in tl.static_range(M):
                DT = tl.tuple([])
                DTU = tl.tuple([])
                Y = tl.tuple([])
                for e in tl.static_range(CB):
                    ve = v & CM[e]
                    dl = tl.load(DP[e] + m * sd_m + p * sd_l, mask=ve, other=0.0).to(tl.float32)
                    uu = tl.load(UP[e] + m * su_m + p * su_l, mask=ve, other=0.0).to(tl.float32)
                    dt = tl.where(ve, _softplus(dl + BIAS[e]), 0.0)
                    DT = DT + (dt,)
                    DTU = DTU + (dt * uu,)
                    Y = Y + (DSK[e] * uu,)
                DTS2 = tl.tuple([])
                for e in tl.static_range(CB):
                    DTS2 = DTS2 + (DTS[e] + DT[e],)
                DTS = DTS2
                pb = b_base + m * sb_m + p * sb_l
                pc = c_base + m * sc_m + p * sc_l
                H2 = tl.tuple([])
                for n in tl.static_range(N):
                    bn = tl.load(pb + n * sb_n, mask=v, other=0.0).to(tl.float32)
                    if WITH_Y:
                        cn = tl.load(pc + n * sc_n, mask=v, other=0.0).to(tl.float32)
                    Y2 = tl.tuple([])
                    for e in tl.static_range(CB):
                        h = _exp2(DT[e] * A2[n * CB + e]) * Hs[n * CB + e] + DTU[e] * bn
                        H2 = H2 + (h,)
                        if WITH_Y:
                            Y2 = Y2 + (Y[e] + cn * h,)
                    if WITH_Y:
                        Y = Y2
                Hs = H2
                if WITH_Y:
                    for e in tl.static_range(CB):
                        tl.atomic_add(OP[e] + m * so_m + p * so_l, Y[e], mask=v & CM[e], sem="relaxed")
    if not WITH_Y:
        # a segment slot past the line's end stays an identity for the combine: dt sum 0, state 0
        for e in tl.static_range(CB):
            c = c0 + e
            tl.store(dts_ptr + row * d + c, DTS[e], mask=CM[e])
            for n in tl.static_range(N):
                tl.store(st_ptr + (row * d + c) * N + n, Hs[n * CB + e], mask=CM[e])


@triton.jit
def _combine_rows(v_slab, dts_slab, ii, ne, s, c, smask, d, N, REVERSE: tl.constexpr):
    """(JB, SB) contributions and dt sums of the chunk slots at scan positions ``ii``
    (identities past the end)."""
    if REVERSE:
        ee = ne - 1 - ii
    else:
        ee = ii
    m2 = (ii < ne)[:, None] & smask[None, :]
    v = tl.load(v_slab + ee[:, None] * (d * N) + s[None, :], mask=m2, other=0.0)
    ds = tl.load(dts_slab + ee[:, None] * d + c[None, :], mask=m2, other=0.0)
    return v, ds


@_scan_jit
def _chunk_combine_kernel(
    v_ptr,  # (b*K, NL, NS, d, N) f32: per-chunk local contribution
    dts_ptr,  # (b*K, NL, NS, d) f32: per-chunk sum of dt (a chunk decays by exp(A * it))
    a2_ptr,  # (K*d, N) f32: A * log2(e)
    o_ptr,  # (b*K, NL, NS, d, N) f32 out: exclusive scan over the chunks (scan order or reversed)
    H, W, N, NL, NS, d,
    K: tl.constexpr, REVERSE: tl.constexpr, JB: tl.constexpr, SB: tl.constexpr,
):  # fmt: skip
    """Over the chunk slots e = line * NS + segment of one direction (slots past a
    line's last segment hold identities, written by the producers): forward ``o_0 = 0, o_{e+1} = dec_e o_e +
    v_e``; reverse ``o_last = 0, o_{e-1} = dec_e o_e + v_e``, ``dec_e = exp(A dts_e)``."""
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    k = pid_bk % K
    is_col = k % 2
    nl = H + is_col * (W - H)
    ne = nl * NS
    s = pid_s * SB + tl.arange(0, SB)
    smask = s < d * N
    c = s // N
    a2 = tl.load(a2_ptr + k * d * N + s, mask=smask, other=0.0)
    slab = pid_bk.to(tl.int64) * NL * NS
    v_slab = v_ptr + slab * d * N
    dts_slab = dts_ptr + slab * d
    o_slab = o_ptr + slab * d * N
    if REVERSE:
        first = ne - 1
    else:
        first = 0
    zero = tl.zeros([SB], tl.float32)
    tl.store(o_slab + first * d * N + s, zero, mask=smask)
    carry = tl.zeros([SB], tl.float32)
    ii = tl.arange(0, JB)
    v, ds = _combine_rows(v_slab, dts_slab, ii, ne, s, c, smask, d, N, REVERSE)
    for eb in range(0, ne, JB):
        # the next block's loads go out before this block's scan
        v_nx, ds_nx = _combine_rows(v_slab, dts_slab, eb + JB + ii, ne, s, c, smask, d, N, REVERSE)
        pa, pb = tl.associative_scan((tl.exp2(a2[None, :] * ds), v), 0, _combine)
        incl = pa * carry[None, :] + pb
        if REVERSE:
            eo = ne - 2 - (eb + ii)
        else:
            eo = eb + ii + 1
        mo = (eb + ii + 1 < ne)[:, None] & smask[None, :]
        tl.store(o_slab + eo[:, None] * (d * N) + s[None, :], incl, mask=mo)
        # rows past the last slot are identities, so the block's last row is the carry
        carry = tl.sum(tl.where((ii == JB - 1)[:, None], incl, 0.0), axis=0)
        v = v_nx
        ds = ds_nx


# --------------------------------------------------------------------- backward


@_scan_jit
def _bwd_sweep_kernel(
    u_ptr, dl_ptr, a2_ptr, b_ptr, c_ptr, bias_ptr, g_ptr,
    hin_ptr,  # (b*K, NL, NS, d, N) f32: state entering every chunk (forward pass 2)
    ck_ptr,  # (b*K, NL, NBLK, d, N) f32 out: state entering every block of TB steps of a line
    p_ptr,  # (b*K, NL, NS, d, N) f32 scratch: product of the decays since the chunk start
    e_ptr,  # (b*K, NL, NS, d, N) f32 out: adjoint that a chunk passes to the state before it
    H, W, N, NL, NS, SEG, NBLK, d,
    su_b, su_m, su_c, su_l,
    sd_b, sd_m, sd_k, sd_c, sd_l,
    sb_b, sb_m, sb_k, sb_n, sb_l,
    sc_b, sc_m, sc_k, sc_n, sc_l,
    sg_b, sg_m, sg_c, sg_l,
    K: tl.constexpr, M: tl.constexpr, CB: tl.constexpr, G: tl.constexpr, TB: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    NT: tl.constexpr = TB * M
    bi, k, bk, j, lmask, line_off, llen, pos_step, lo, hi, row = _chunk(
        tl.program_id(0), tl.program_id(1), NL, NS, SEG, H, W, K, G, ROWS
    )
    c = tl.program_id(2) * CB + tl.arange(0, CB)
    cmask = c < d
    kc = k * d + c
    lc = cmask[:, None] & lmask[None, :]
    one = tl.zeros([1], tl.int32) == 0
    bias = tl.load(bias_ptr + kc, mask=cmask, other=0.0)[:, None]
    u_base = u_ptr + bi * su_b + c[:, None] * su_c
    dl_base = dl_ptr + bi * sd_b + k * sd_k + c[:, None] * sd_c
    g_base = g_ptr + bi * sg_b + c[:, None] * sg_c
    b_base = b_ptr + bi * sb_b + k * sb_k + tl.zeros([1, 1], tl.int32)
    c_base = c_ptr + bi * sc_b + k * sc_k + tl.zeros([1, 1], tl.int32)
    st_off = (row * d + c[:, None]) * N
    ck_ptrs = ck_ptr + ((bk.to(tl.int64) * NL + j[None, :]) * NBLK * d + c[:, None]) * N
    a2_ptrs = a2_ptr + kc * N
    for i0 in range(lo, hi, TB):
        P, V, pos2, ok2 = _block(i0, line_off, lmask, llen, pos_step, M, TB)
        DL = _tokens(dl_base, sd_m, sd_l, cmask, P, V, pos2, ok2, M, TB, ROWS)
        UU = _tokens(u_base, su_m, su_l, cmask, P, V, pos2, ok2, M, TB, ROWS)
        GY = _tokens(g_base, sg_m, sg_l, cmask, P, V, pos2, ok2, M, TB, ROWS)
        DT = tl.tuple([])
        DTU = tl.tuple([])
        for t in tl.static_range(NT):
            dt = tl.where(cmask[:, None] & V[t][None, :], _softplus(DL[t] + bias), 0.0)
            DT = DT + (dt,)
            DTU = DTU + (dt * UU[t],)
        ck_blk = ck_ptrs + (i0 // TB) * (d * N)
        for n in range(N):
            a2 = tl.load(a2_ptrs + n, mask=cmask, other=0.0)[:, None]
            h = tl.load(hin_ptr + st_off + n, mask=lc & (i0 == lo), other=0.0)
            h += tl.load(ck_blk + n, mask=lc & (i0 > lo), other=0.0)
            tl.store(ck_blk + n, h, mask=lc & (i0 == lo))
            pr = tl.load(p_ptr + st_off + n, mask=lc & (i0 > lo), other=1.0)
            e = tl.load(e_ptr + st_off + n, mask=lc & (i0 > lo), other=0.0)
            BV = _tokens(b_base + n * sb_n, sb_m, sb_l, one, P, V, pos2, ok2, M, TB, ROWS)
            CV = _tokens(c_base + n * sc_n, sc_m, sc_l, one, P, V, pos2, ok2, M, TB, ROWS)
            for t in tl.static_range(NT):
                a = _exp2(DT[t] * a2)
                h = a * h + DTU[t] * BV[t]
                pr = pr * a
                e += pr * (GY[t] * CV[t])
            tl.store(ck_blk + d * N + n, h, mask=lc & (i0 + TB < hi))
            tl.store(p_ptr + st_off + n, pr, mask=lc)
            tl.store(e_ptr + st_off + n, e, mask=lc)
    zero = tl.zeros([CB, G], tl.float32)
    for n in range(N):  # a segment slot past the line's end is an identity for the combine
        tl.store(e_ptr + st_off + n, zero, mask=lc & (lo >= llen))


@_scan_jit
def _bwd_kernel(
    u_ptr, dl_ptr, a2_ptr, b_ptr, c_ptr, dsk_ptr, bias_ptr, g_ptr,
    ck_ptr,  # (b*K, NL, NBLK, d, N) f32: state entering every block (sweep)
    q_ptr,  # (b*K, NL, NS, d, N) f32: adjoint arriving at every chunk's last token (clobbered)
    gdl_ptr,  # (b, M, K, d, L) out, contiguous, delta's dtype
    gu_ptr,  # (b, M, d, L) f32, zeroed (atomic)
    gb_ptr, gc_ptr,  # (b, M, K, N, L) f32, zeroed (atomic)
    ga_ptr,  # (b*K, GRID0, d, N) f32, zeroed: per program partial dL/dA
    gdsk_ptr, gbias_ptr,  # (b*K, GRID0, d) f32 out: per program partial dL/dD, dL/d(delta_bias)
    H, W, N, NL, NS, SEG, NBLK, GRID0, d,
    su_b, su_m, su_c, su_l,
    sd_b, sd_m, sd_k, sd_c, sd_l,
    sb_b, sb_m, sb_k, sb_n, sb_l,
    sc_b, sc_m, sc_k, sc_n, sc_l,
    sg_b, sg_m, sg_c, sg_l,
    K: tl.constexpr, M: tl.constexpr, CB: tl.constexpr, G: tl.constexpr, TB: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    NT: tl.constexpr = TB * M
    pid0 = tl.program_id(0)
    bi, k, bk, j, lmask, line_off, llen, pos_step, lo, hi, row = _chunk(
        pid0, tl.program_id(1), NL, NS, SEG, H, W, K, G, ROWS
    )
    L = H * W
    c = tl.program_id(2) * CB + tl.arange(0, CB)
    cmask = c < d
    kc = k * d + c
    lc = cmask[:, None] & lmask[None, :]
    one = tl.zeros([1], tl.int32) == 0
    bias = tl.load(bias_ptr + kc, mask=cmask, other=0.0)[:, None]
    dsk = tl.load(dsk_ptr + kc, mask=cmask, other=0.0)[:, None]
    u_base = u_ptr + bi * su_b + c[:, None] * su_c
    dl_base = dl_ptr + bi * sd_b + k * sd_k + c[:, None] * sd_c
    g_base = g_ptr + bi * sg_b + c[:, None] * sg_c
    b_base = b_ptr + bi * sb_b + k * sb_k + tl.zeros([1, 1], tl.int32)
    c_base = c_ptr + bi * sc_b + k * sc_k + tl.zeros([1, 1], tl.int32)
    gb_base = gb_ptr + (bi * M * K + k) * (N * L) + tl.zeros([1, 1], tl.int32)
    gc_base = gc_ptr + (bi * M * K + k) * (N * L) + tl.zeros([1, 1], tl.int32)
    gu_base = gu_ptr + bi * (M * d * L) + c[:, None] * L
    gdl_base = gdl_ptr + (bi * M * K + k) * (d * L) + c[:, None] * L
    q_ptrs = q_ptr + (row * d + c[:, None]) * N
    ck_ptrs = ck_ptr + ((bk.to(tl.int64) * NL + j[None, :]) * NBLK * d + c[:, None]) * N
    a2_ptrs = a2_ptr + kc * N
    part = (bk.to(tl.int64) * GRID0 + pid0) * d + c
    nb = (hi - lo + TB - 1) // TB
    gd_acc = tl.zeros([CB, G], tl.float32)
    gbias_acc = tl.zeros([CB, G], tl.float32)
    for ib in range(0, nb):
        i0 = lo + (nb - 1 - ib) * TB
        P, V, pos2, ok2 = _block(i0, line_off, lmask, llen, pos_step, M, TB)
        DL = _tokens(dl_base, sd_m, sd_l, cmask, P, V, pos2, ok2, M, TB, ROWS)
        UU = _tokens(u_base, su_m, su_l, cmask, P, V, pos2, ok2, M, TB, ROWS)
        GY = _tokens(g_base, sg_m, sg_l, cmask, P, V, pos2, ok2, M, TB, ROWS)
        DT = tl.tuple([])
        DTU = tl.tuple([])
        GA = tl.tuple([])  # sum over n of A g (h - x), per token
        GB = tl.tuple([])  # sum over n of g B, per token
        for t in tl.static_range(NT):
            dt = tl.where(cmask[:, None] & V[t][None, :], _softplus(DL[t] + bias), 0.0)
            DT = DT + (dt,)
            DTU = DTU + (dt * UU[t],)
            GA = GA + (tl.zeros([CB, G], tl.float32),)
            GB = GB + (tl.zeros([CB, G], tl.float32),)
            gd_acc += GY[t] * UU[t]
        ck_blk = ck_ptrs + (i0 // TB) * (d * N)
        # n = 0, then in iteration n the loads of n + 1
        a2 = tl.load(a2_ptrs, mask=cmask, other=0.0)[:, None]
        h = tl.load(ck_blk, mask=lc, other=0.0)
        gnext = tl.load(q_ptrs, mask=lc, other=0.0)
        BV = _tokens(b_base, sb_m, sb_l, one, P, V, pos2, ok2, M, TB, ROWS)
        CV = _tokens(c_base, sc_m, sc_l, one, P, V, pos2, ok2, M, TB, ROWS)
        for n in range(N):
            ok = n + 1 < N
            okn = one & ok
            a2_nx = tl.load(a2_ptrs + n + 1, mask=cmask & ok, other=0.0)[:, None]
            h_nx = tl.load(ck_blk + n + 1, mask=lc & ok, other=0.0)
            gnext_nx = tl.load(q_ptrs + n + 1, mask=lc & ok, other=0.0)
            BV_nx = _tokens(b_base + (n + 1) * sb_n, sb_m, sb_l, okn, P, V, pos2, ok2, M, TB, ROWS)
            CV_nx = _tokens(c_base + (n + 1) * sc_n, sc_m, sc_l, okn, P, V, pos2, ok2, M, TB, ROWS)
            HS = tl.tuple([])
            AS = tl.tuple([])
            for t in tl.static_range(NT):
                a = _exp2(DT[t] * a2)
                h = a * h + DTU[t] * BV[t]
                HS = HS + (h,)
                AS = AS + (a,)
            # last token first: dL/dh_t = gy_t C_t + a_{t+1} dL/dh_{t+1}
            GA2 = tl.tuple([])
            GB2 = tl.tuple([])
            GBV2 = tl.tuple([])
            GCV2 = tl.tuple([])
            gacc = tl.zeros([CB, G], tl.float32)
            for q in tl.static_range(NT):
                g = GY[NT - 1 - q] * CV[NT - 1 - q] + gnext
                gr = g * (HS[NT - 1 - q] - DTU[NT - 1 - q] * BV[NT - 1 - q])  # g * a_t h_{t-1}
                GA2 = GA2 + (GA[NT - 1 - q] + gr * (a2 * LN2),)
                GB2 = GB2 + (GB[NT - 1 - q] + g * BV[NT - 1 - q],)
                gacc += gr * DT[NT - 1 - q]
                GBV2 = GBV2 + (tl.sum(g * DTU[NT - 1 - q], axis=0)[None, :],)
                GCV2 = GCV2 + (tl.sum(GY[NT - 1 - q] * HS[NT - 1 - q], axis=0)[None, :],)
                gnext = AS[NT - 1 - q] * g
            GA = tl.tuple([])
            GB = tl.tuple([])
            GBV = tl.tuple([])
            GCV = tl.tuple([])
            for t in tl.static_range(NT):
                GA = GA + (GA2[NT - 1 - t],)
                GB = GB + (GB2[NT - 1 - t],)
                GBV = GBV + (GBV2[NT - 1 - t],)
                GCV = GCV + (GCV2[NT - 1 - t],)
            _put(gb_base + n * L, K * N * L, one, GBV, P, V, pos2, ok2, M, TB, ROWS, True)
            _put(gc_base + n * L, K * N * L, one, GCV, P, V, pos2, ok2, M, TB, ROWS, True)
            tl.store(q_ptrs + n, gnext, mask=lc)
            ga_old = tl.load(ga_ptr + part * N + n, mask=cmask, other=0.0)
            tl.store(ga_ptr + part * N + n, ga_old + tl.sum(gacc, axis=1), mask=cmask)
            a2 = a2_nx
            h = h_nx
            gnext = gnext_nx
            BV = BV_nx
            CV = CV_nx
        GU = tl.tuple([])
        for t in tl.static_range(NT):
            GU = GU + (DT[t] * GB[t] + dsk * GY[t],)
        _put(gu_base, d * L, cmask, GU, P, V, pos2, ok2, M, TB, ROWS, True)
        DL = _tokens(dl_base, sd_m, sd_l, cmask, P, V, pos2, ok2, M, TB, ROWS)
        UU = _tokens(u_base, su_m, su_l, cmask, P, V, pos2, ok2, M, TB, ROWS)
        GDL = tl.tuple([])
        for t in tl.static_range(NT):
            gdl = tl.where(cmask[:, None] & V[t][None, :], (UU[t] * GB[t] + GA[t]) * _sigmoid(DL[t] + bias), 0.0)
            GDL = GDL + (gdl,)
            gbias_acc += gdl
        _put(gdl_base, K * d * L, cmask, GDL, P, V, pos2, ok2, M, TB, ROWS, False)
    tl.store(gdsk_ptr + part, tl.sum(gd_acc, axis=1), mask=cmask)
    tl.store(gbias_ptr + part, tl.sum(gbias_acc, axis=1), mask=cmask)


# ------------------------------------------------------------------------- host


def _check(u, delta, A, B, C, D, delta_bias, height: int, width: int) -> None:
    check_cross_scan_args(u, delta, A, B, C, D, delta_bias, height, width)
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias}
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"the triton scan backend takes float32, bfloat16 or float16 tensors; {name} is {t.dtype} "
                "(use backend='reference' for other dtypes)"
            )
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}; put every input on one device")


def _classes(K: int) -> list[tuple[bool, int]]:
    """(ROWS, directions in the class): row directions 0, 2 and column directions 1, 3."""
    return [(rows, n) for rows, n in ((True, (K + 1) // 2), (False, K // 2)) if n]


def _steps(steps: int, M: int) -> int:
    return max(1, steps // M)


def _segments(H: int, W: int, b: int, K: int, d: int, M: int) -> tuple[int, int]:
    """(SEG, NS): steps per chunk (a multiple of the backward's block) and chunk slots
    per line, so that a forward launch has about TARGET_LANES lanes."""
    longest = max(H, W)
    unit = _steps(BWD_STEPS, M)
    lanes = longest * b * K * triton.cdiv(d, FWD_CB)
    splits = max(1, min(triton.cdiv(TARGET_LANES, lanes), triton.cdiv(longest, unit)))
    seg = triton.cdiv(triton.cdiv(longest, splits), unit) * unit
    return seg, triton.cdiv(longest, seg)


class _CrossScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, height: int, width: int):  # type: ignore[override]
        b, M, d, L = u.shape
        K, N = delta.shape[2], A.shape[1]
        H, W = int(height), int(width)
        dev, f32 = u.device, torch.float32
        a2 = (A.detach().to(f32) * LOG2E).contiguous()
        dsk = D.detach().to(f32).contiguous()
        bias = delta_bias.detach().to(f32).contiguous()
        NL = max(H, W)
        seg, ns = _segments(H, W, b, K, d, M)
        grid = (triton.cdiv(NL * triton.cdiv(d, FWD_CB), FWD_LANES) * ns, b * K)
        consts = dict(K=K, M=M, N=N, CB=FWD_CB, E=FWD_LANES, TB=FWD_UNROLL, num_warps=max(1, FWD_LANES // 32))
        sizes = (H, W, NL, ns, seg, d)
        # the output in the input's layout: channels innermost (the network's) or positions innermost
        if u.stride(2) < u.stride(3):
            out = torch.zeros(b, M, L, d, device=dev, dtype=f32).transpose(2, 3)
        else:
            out = torch.zeros(b, M, d, L, device=dev, dtype=f32)
        strides = (*u.stride(), *delta.stride(), *B.stride(), *C.stride(), *out.stride())
        state = torch.empty(b * K, NL, ns, d, N, device=dev, dtype=f32)
        dts = torch.empty(b * K, NL, ns, d, device=dev, dtype=f32)
        _fwd_kernel[grid](u, delta, a2, B, C, dsk, bias, state, dts, out, *sizes, *strides, WITH_Y=False, **consts)
        start = torch.empty_like(state)
        _chunk_combine_kernel[(b * K, triton.cdiv(d * N, COMBINE_STATES))](
            state, dts, a2, start, H, W, N, NL, ns, d,
            K=K, REVERSE=False, JB=COMBINE_ROWS, SB=COMBINE_STATES, num_warps=COMBINE_WARPS,
        )  # fmt: skip
        del state
        _fwd_kernel[grid](u, delta, a2, B, C, dsk, bias, start, dts, out, *sizes, *strides, WITH_Y=True, **consts)
        if any(ctx.needs_input_grad[:7]):
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, start, dts)
            ctx.plan = (H, W, seg, ns)
        return out if u.dtype == f32 else out.to(u.dtype)

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        u, delta, A, B, C, D, delta_bias, start, dts = ctx.saved_tensors
        H, W, seg, ns = ctx.plan
        # the backward kernels read along positions: positions innermost (a no-op when already so)
        u, delta, B, C, gout = (t.contiguous() for t in (u, delta, B, C, gout))
        b, M, d, L = u.shape
        K, N = delta.shape[2], A.shape[1]
        dev, f32 = u.device, torch.float32
        a2 = (A.detach().to(f32) * LOG2E).contiguous()
        dsk = D.detach().to(f32).contiguous()
        bias = delta_bias.detach().to(f32).contiguous()
        NL = max(H, W)
        tb = _steps(BWD_STEPS, M)
        nblk = triton.cdiv(NL, tb)
        grid0, grid2 = triton.cdiv(NL, 32 * NUM_WARPS) * ns, triton.cdiv(d, BWD_CB)
        consts = dict(K=K, M=M, CB=BWD_CB, G=32 * NUM_WARPS, TB=tb, num_warps=NUM_WARPS)
        strides = (*u.stride(), *delta.stride(), *B.stride(), *C.stride(), *gout.stride())
        ck = torch.empty(b * K, NL, nblk, d, N, device=dev, dtype=f32)
        prod = torch.empty_like(start)
        local = torch.empty_like(start)
        for rows, kc in _classes(K):
            _bwd_sweep_kernel[(grid0, b * kc, grid2)](u, delta, a2, B, C, bias, gout, start, ck, prod, local,
                                                      H, W, N, NL, ns, seg, nblk, d, *strides, ROWS=rows, **consts)  # fmt: skip
        del prod
        arriving = torch.empty_like(start)
        _chunk_combine_kernel[(b * K, triton.cdiv(d * N, COMBINE_STATES))](
            local, dts, a2, arriving, H, W, N, NL, ns, d,
            K=K, REVERSE=True, JB=COMBINE_ROWS, SB=COMBINE_STATES, num_warps=COMBINE_WARPS,
        )  # fmt: skip
        del local
        g_delta = torch.empty(b, M, K, d, L, device=dev, dtype=delta.dtype)
        g_u = torch.zeros(b, M, d, L, device=dev, dtype=f32)
        g_B = torch.zeros(b, M, K, N, L, device=dev, dtype=f32)
        g_C = torch.zeros(b, M, K, N, L, device=dev, dtype=f32)
        g_A = torch.zeros(b * K, grid0, d, N, device=dev, dtype=f32)
        g_D = torch.empty(b * K, grid0, d, device=dev, dtype=f32)
        g_bias = torch.empty(b * K, grid0, d, device=dev, dtype=f32)
        for rows, kc in _classes(K):
            _bwd_kernel[(grid0, b * kc, grid2)](u, delta, a2, B, C, dsk, bias, gout, ck, arriving, g_delta, g_u, g_B,
                                                g_C, g_A, g_D, g_bias, H, W, N, NL, ns, seg, nblk, grid0, d, *strides,
                                                ROWS=rows, **consts)  # fmt: skip
        g_A = g_A.view(b, K, grid0, d, N).sum((0, 2)).reshape(K * d, N)
        g_D = g_D.view(b, K, grid0, d).sum((0, 2)).reshape(K * d)
        g_bias = g_bias.view(b, K, grid0, d).sum((0, 2)).reshape(K * d)
        return (
            g_u.to(u.dtype),
            g_delta,
            g_A.to(A.dtype),
            g_B.to(B.dtype),
            g_C.to(C.dtype),
            g_D.to(D.dtype),
            g_bias.to(delta_bias.dtype),
            None,
            None,
        )


def cross_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """SS2D (M = 1) / Cross SS2D (M = 2) scan core on the GPU.

    Layouts as :func:`s4fusion.ops.reference.cross_scan_ref`: ``u`` (b, M, d, L),
    ``delta`` (b, M, K, d, L), ``A`` (K*d, N), ``B``/``C`` (b, M, K, N, L),
    ``D``/``delta_bias`` (K*d,), L = height*width in row-major order. Returns
    (b, M, d, L) in ``u.dtype``; differentiable in every tensor input.
    """
    _check(u, delta, A, B, C, D, delta_bias, height, width)
    return _CrossScan.apply(u, delta, A, B, C, D, delta_bias, height, width)
