"""Triton GPU backend of the SS2D / Cross SS2D scan core (``cross_scan``).

Same signature, layouts and semantics as
:func:`s4fusion.ops.reference.cross_scan_ref` (the specification), with gradients
of every tensor input. Inputs in float32, bfloat16 or float16 (any strides); the
recurrent state, every accumulation and the returned gradients' arithmetic are
float32; the output and the gradients come back in their tensor's dtype.

Algorithm (no copy of the inputs is made; direction unfolding, modality
interleaving and the recovery sum are index arithmetic inside the kernels):

* The scan sequence of direction k is cut at image lines: rows for k = 0, 2,
  columns for k = 1, 3, every line visited in scan order. Token t of a line is
  modality ``t % M`` at step ``t // M`` (infrared first). Position of line j,
  step i: ``base_k + j * line_step_k + i * pos_step_k`` (row-major index).
* Forward, pass 1 (``_fwd_kernel``, ``WITH_Y=False``): every line from a zero
  state, in parallel over (line, direction, batch, channel block): the line's
  end state and its sum of steps ``dt``.
* Pass 2 (``_line_combine_kernel``): a scan over the lines of each direction
  gives every line its true start state ``h0_j`` (decay of a line:
  ``exp(A * sum dt)``).
* Pass 3 (``_fwd_kernel``, ``WITH_Y=True``): every line again from ``h0_j``,
  ``y = C.h + D u`` added atomically (float32) at its row-major position, so the
  four directions sum in place.
* Backward: ``_bwd_sweep_kernel`` walks each line forward from ``h0_j`` and
  stores the state at the start of every block of ``TB`` steps, plus the
  line-local adjoint it passes to the previous line; ``_line_combine_kernel``
  (reversed) gives every line the adjoint arriving from the lines after it;
  ``_bwd_kernel`` walks the blocks of every line backwards, recomputes the
  block's states from its stored start and accumulates all gradients.

Work layout in every scan kernel: a program owns ``G = 32 * num_warps`` lines
(one per thread) and ``CB`` channels (in the thread), loops over the blocks of
its lines; inside a block the ``TB * M`` tokens are unrolled (``tl.static_range``
and tuples) and the state index n (``N`` is a compile-time constant) too, so the
recurrence runs in registers, sequentially per thread. ``H``, ``W``, the number
of lines and the size-dependent strides are runtime values that are not
specialised on: one compiled kernel serves every image size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cross_scan_triton"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Launch configuration: lines per program = 32 * NUM_WARPS, channels per thread,
# scan steps per unrolled block (forward / backward, for M = 1; halved for M = 2).
NUM_WARPS = 1
FWD_CB, FWD_STEPS = 4, 8
BWD_CB, BWD_STEPS = 2, 8
COMBINE_LINES, COMBINE_STATES = 64, 32

_SIZE_ARGS = ["H", "W", "NL", "NBLK"]
_STRIDES_U = ["su_b", "su_m", "su_c"]
_STRIDES_D = ["sd_b", "sd_m", "sd_k", "sd_c"]
_STRIDES_B = ["sb_b", "sb_m", "sb_k", "sb_n"]
_STRIDES_C = ["sc_b", "sc_m", "sc_k", "sc_n"]
_STRIDES_G = ["sg_b", "sg_m", "sg_c"]


# ---------------------------------------------------------------------- helpers


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20) in float32."""
    e = tl.exp(tl.minimum(x, 20.0))
    z = 1.0 + e
    # log1p(e) to full precision: log(z) * e / (z - 1), exact when z rounds to 1.
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
def _block_positions(i0, line_off, lmask, llen, pos_step, TB: tl.constexpr):
    """Row-major positions (G,) and validity of the TB steps i0 .. i0+TB-1."""
    P = tl.tuple([])
    V = tl.tuple([])
    for s in tl.static_range(TB):
        i = i0 + s
        P = P + (line_off + i * pos_step,)
        V = V + (lmask & (i < llen),)
    return P, V


# ---------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=_SIZE_ARGS + _STRIDES_U + _STRIDES_D + _STRIDES_B + _STRIDES_C)
def _fwd_kernel(
    u_ptr, dl_ptr, a2_ptr, b_ptr, c_ptr, dsk_ptr, bias_ptr,
    st_ptr,  # (b*K, NL, d, N) f32: pass 1 writes line-local end states; pass 3 reads start states (clobbered)
    dts_ptr,  # (b*K, NL, d) f32: pass 1 writes the line sums of dt
    out_ptr,  # (b, M, d, L) f32, zeroed: pass 3 adds y
    H, W, NL, NBLK, d,
    su_b, su_m, su_c, su_l,
    sd_b, sd_m, sd_k, sd_c, sd_l,
    sb_b, sb_m, sb_k, sb_n, sb_l,
    sc_b, sc_m, sc_k, sc_n, sc_l,
    K: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
    CB: tl.constexpr, G: tl.constexpr, TB: tl.constexpr, WITH_Y: tl.constexpr,
):  # fmt: skip
    pid_l = tl.program_id(0)
    pid_bk = tl.program_id(1)
    pid_c = tl.program_id(2)
    bi = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    nlines, llen, base, line_step, pos_step = _geometry(k, H, W)
    j = pid_l * G + tl.arange(0, G)
    lmask = j < nlines
    line_off = base + j * line_step
    c = pid_c * CB + tl.arange(0, CB)
    cmask = c < d
    kc = k * d + c
    lc = cmask[:, None] & lmask[None, :]
    bias = tl.load(bias_ptr + kc, mask=cmask, other=0.0)[:, None]
    dsk = tl.load(dsk_ptr + kc, mask=cmask, other=0.0)[:, None]
    u_base = u_ptr + bi * su_b + c[:, None] * su_c
    dl_base = dl_ptr + bi * sd_b + k * sd_k + c[:, None] * sd_c
    b_base = b_ptr + bi * sb_b + k * sb_k
    c_base = c_ptr + bi * sc_b + k * sc_k
    st_off = (pid_bk.to(tl.int64) * NL + j[None, :]) * (d * N) + c[:, None] * N
    out_base = out_ptr + bi * (M * d * H * W) + c[:, None] * (H * W)
    trip = tl.where(pid_l * G < nlines, llen, 0)
    dtsum = tl.zeros([CB, G], tl.float32)
    for i0 in range(0, trip, TB):
        P, V = _block_positions(i0, line_off, lmask, llen, pos_step, TB)
        DT = tl.tuple([])
        DTU = tl.tuple([])
        Y = tl.tuple([])
        for s in tl.static_range(TB):
            m2 = cmask[:, None] & V[s][None, :]
            for m in tl.static_range(M):
                dl = tl.load(dl_base + m * sd_m + P[s][None, :] * sd_l, mask=m2, other=0.0).to(tl.float32)
                uu = tl.load(u_base + m * su_m + P[s][None, :] * su_l, mask=m2, other=0.0).to(tl.float32)
                dt = tl.where(m2, _softplus(dl + bias), 0.0)
                DT = DT + (dt,)
                DTU = DTU + (dt * uu,)
                if WITH_Y:
                    Y = Y + (dsk * uu,)
                else:
                    dtsum += dt
        for n in tl.static_range(N):
            a2 = tl.load(a2_ptr + kc * N + n, mask=cmask, other=0.0)[:, None]
            if WITH_Y:
                h = tl.load(st_ptr + st_off + n, mask=lc, other=0.0)
            else:
                h = tl.load(st_ptr + st_off + n, mask=lc & (i0 > 0), other=0.0)
            Y2 = tl.tuple([])
            for s in tl.static_range(TB):
                for m in tl.static_range(M):
                    t: tl.constexpr = s * M + m
                    bv = tl.load(b_base + m * sb_m + n * sb_n + P[s] * sb_l, mask=V[s], other=0.0).to(tl.float32)
                    h = tl.exp2(DT[t] * a2) * h + DTU[t] * bv[None, :]
                    if WITH_Y:
                        cv = tl.load(c_base + m * sc_m + n * sc_n + P[s] * sc_l, mask=V[s], other=0.0)
                        Y2 = Y2 + (Y[t] + cv.to(tl.float32)[None, :] * h,)
            tl.store(st_ptr + st_off + n, h, mask=lc)
            if WITH_Y:
                Y = Y2
        if WITH_Y:
            for s in tl.static_range(TB):
                m2 = cmask[:, None] & V[s][None, :]
                for m in tl.static_range(M):
                    tl.atomic_add(out_base + m * (d * H * W) + P[s][None, :], Y[s * M + m], mask=m2, sem="relaxed")
    if not WITH_Y:
        dts_off = (pid_bk.to(tl.int64) * NL + j[None, :]) * d + c[:, None]
        tl.store(dts_ptr + dts_off, dtsum, mask=lc)


@triton.jit(do_not_specialize=["H", "W", "NL"])
def _line_combine_kernel(
    v_ptr,  # (b*K, NL, d, N) f32: per-line local contribution
    dts_ptr,  # (b*K, NL, d) f32: per-line sum of dt (decay of the line = exp(A * it))
    a2_ptr,  # (K*d, N) f32: A * log2(e)
    o_ptr,  # (b*K, NL, d, N) f32 out: exclusive scan over the lines (in scan or reverse order)
    o2_ptr,  # optional second copy of the output (SAVE2)
    H, W, NL, d,
    K: tl.constexpr, N: tl.constexpr, REVERSE: tl.constexpr, SAVE2: tl.constexpr,
    JB: tl.constexpr, SB: tl.constexpr,
):  # fmt: skip
    """Forward: ``o_0 = 0, o_{j+1} = dec_j o_j + v_j``; reverse:
    ``o_{nl-1} = 0, o_{j-1} = dec_j o_j + v_j``, with ``dec_j = exp(A * dts_j)``."""
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    k = pid_bk % K
    nl = H + (k % 2) * (W - H)
    s = pid_s * SB + tl.arange(0, SB)
    smask = s < d * N
    c = s // N
    a2 = tl.load(a2_ptr + k * d * N + s, mask=smask, other=0.0)
    base = pid_bk.to(tl.int64) * NL * d * N
    dbase = pid_bk.to(tl.int64) * NL * d
    if REVERSE:
        first = nl - 1
    else:
        first = 0
    zero = tl.zeros([SB], tl.float32)
    tl.store(o_ptr + base + first * d * N + s, zero, mask=smask)
    if SAVE2:
        tl.store(o2_ptr + base + first * d * N + s, zero, mask=smask)
    carry = tl.zeros([SB], tl.float32)
    for jb in range(0, nl, JB):
        ii = jb + tl.arange(0, JB)
        if REVERSE:
            jj = nl - 1 - ii
            jo = nl - 2 - ii
        else:
            jj = ii
            jo = ii + 1
        m2 = (ii < nl)[:, None] & smask[None, :]
        v = tl.load(v_ptr + base + jj[:, None] * (d * N) + s[None, :], mask=m2, other=0.0)
        ds = tl.load(dts_ptr + dbase + jj[:, None] * d + c[None, :], mask=m2, other=0.0)
        dec = tl.exp2(a2[None, :] * ds)
        pa, pb = tl.associative_scan((dec, v), 0, _combine)
        incl = pa * carry[None, :] + pb
        mo = (ii + 1 < nl)[:, None] & smask[None, :]
        tl.store(o_ptr + base + jo[:, None] * (d * N) + s[None, :], incl, mask=mo)
        if SAVE2:
            tl.store(o2_ptr + base + jo[:, None] * (d * N) + s[None, :], incl, mask=mo)
        # rows past the last line are identities, so the last row is the carry
        carry = tl.sum(tl.where((ii == jb + JB - 1)[:, None], incl, 0.0), axis=0)


# --------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=_SIZE_ARGS + _STRIDES_U + _STRIDES_D + _STRIDES_B + _STRIDES_C + _STRIDES_G)
def _bwd_sweep_kernel(
    u_ptr, dl_ptr, a2_ptr, b_ptr, c_ptr, bias_ptr, g_ptr,
    hin_ptr,  # (b*K, NL, d, N) f32: state entering every line (forward pass 2)
    ck_ptr,  # (b*K, NL, NBLK, d, N) f32 out: state entering every block of TB steps
    p_ptr,  # (b*K, NL, d, N) f32 scratch: product of the decays since the line start
    e_ptr,  # (b*K, NL, d, N) f32 out: adjoint that line j passes to the state before it
    H, W, NL, NBLK, d,
    su_b, su_m, su_c, su_l,
    sd_b, sd_m, sd_k, sd_c, sd_l,
    sb_b, sb_m, sb_k, sb_n, sb_l,
    sc_b, sc_m, sc_k, sc_n, sc_l,
    sg_b, sg_m, sg_c, sg_l,
    K: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
    CB: tl.constexpr, G: tl.constexpr, TB: tl.constexpr,
):  # fmt: skip
    pid_l = tl.program_id(0)
    pid_bk = tl.program_id(1)
    pid_c = tl.program_id(2)
    bi = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    nlines, llen, base, line_step, pos_step = _geometry(k, H, W)
    j = pid_l * G + tl.arange(0, G)
    lmask = j < nlines
    line_off = base + j * line_step
    c = pid_c * CB + tl.arange(0, CB)
    cmask = c < d
    kc = k * d + c
    lc = cmask[:, None] & lmask[None, :]
    bias = tl.load(bias_ptr + kc, mask=cmask, other=0.0)[:, None]
    u_base = u_ptr + bi * su_b + c[:, None] * su_c
    dl_base = dl_ptr + bi * sd_b + k * sd_k + c[:, None] * sd_c
    g_base = g_ptr + bi * sg_b + c[:, None] * sg_c
    b_base = b_ptr + bi * sb_b + k * sb_k
    c_base = c_ptr + bi * sc_b + k * sc_k
    st_off = (pid_bk.to(tl.int64) * NL + j[None, :]) * (d * N) + c[:, None] * N
    ck_off = (pid_bk.to(tl.int64) * NL + j[None, :]) * (NBLK * d * N) + c[:, None] * N
    nblk = (llen + TB - 1) // TB
    trip = tl.where(pid_l * G < nlines, nblk, 0)
    for blk in range(0, trip):
        P, V = _block_positions(blk * TB, line_off, lmask, llen, pos_step, TB)
        DT = tl.tuple([])
        DTU = tl.tuple([])
        GY = tl.tuple([])
        for s in tl.static_range(TB):
            m2 = cmask[:, None] & V[s][None, :]
            for m in tl.static_range(M):
                dl = tl.load(dl_base + m * sd_m + P[s][None, :] * sd_l, mask=m2, other=0.0).to(tl.float32)
                uu = tl.load(u_base + m * su_m + P[s][None, :] * su_l, mask=m2, other=0.0).to(tl.float32)
                gy = tl.load(g_base + m * sg_m + P[s][None, :] * sg_l, mask=m2, other=0.0).to(tl.float32)
                dt = tl.where(m2, _softplus(dl + bias), 0.0)
                DT = DT + (dt,)
                DTU = DTU + (dt * uu,)
                GY = GY + (gy,)
        for n in tl.static_range(N):
            a2 = tl.load(a2_ptr + kc * N + n, mask=cmask, other=0.0)[:, None]
            h = tl.load(hin_ptr + st_off + n, mask=lc & (blk == 0), other=0.0) + tl.load(
                ck_ptr + ck_off + blk * (d * N) + n, mask=lc & (blk > 0), other=0.0
            )
            tl.store(ck_ptr + ck_off + n, h, mask=lc & (blk == 0))
            pr = tl.load(p_ptr + st_off + n, mask=lc & (blk > 0), other=1.0)
            e = tl.load(e_ptr + st_off + n, mask=lc & (blk > 0), other=0.0)
            for s in tl.static_range(TB):
                for m in tl.static_range(M):
                    t: tl.constexpr = s * M + m
                    bv = tl.load(b_base + m * sb_m + n * sb_n + P[s] * sb_l, mask=V[s], other=0.0).to(tl.float32)
                    cv = tl.load(c_base + m * sc_m + n * sc_n + P[s] * sc_l, mask=V[s], other=0.0).to(tl.float32)
                    a = tl.exp2(DT[t] * a2)
                    h = a * h + DTU[t] * bv[None, :]
                    pr = pr * a
                    e += pr * (GY[t] * cv[None, :])
            tl.store(ck_ptr + ck_off + (blk + 1) * (d * N) + n, h, mask=lc & (blk + 1 < nblk))
            tl.store(p_ptr + st_off + n, pr, mask=lc)
            tl.store(e_ptr + st_off + n, e, mask=lc)


@triton.jit(do_not_specialize=_SIZE_ARGS + ["NLG"] + _STRIDES_U + _STRIDES_D + _STRIDES_B + _STRIDES_C + _STRIDES_G)
def _bwd_kernel(
    u_ptr, dl_ptr, a2_ptr, b_ptr, c_ptr, dsk_ptr, bias_ptr, g_ptr,
    ck_ptr,  # (b*K, NL, NBLK, d, N) f32: state entering every block (sweep)
    q_ptr,  # (b*K, NL, d, N) f32: adjoint arriving at every line's last token (clobbered)
    gdl_ptr,  # (b, M, K, d, L) out, contiguous, delta's dtype
    gu_ptr,  # (b, M, d, L) f32, zeroed (atomic)
    gb_ptr, gc_ptr,  # (b, M, K, N, L) f32, zeroed (atomic)
    ga_ptr,  # (b*K, NLG, d, N) f32, zeroed: per line group partial dL/dA
    gdsk_ptr, gbias_ptr,  # (b*K, NLG, d) f32: per line group partial dL/dD, dL/d(delta_bias)
    H, W, NL, NBLK, NLG, d,
    su_b, su_m, su_c, su_l,
    sd_b, sd_m, sd_k, sd_c, sd_l,
    sb_b, sb_m, sb_k, sb_n, sb_l,
    sc_b, sc_m, sc_k, sc_n, sc_l,
    sg_b, sg_m, sg_c, sg_l,
    K: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
    CB: tl.constexpr, G: tl.constexpr, TB: tl.constexpr,
):  # fmt: skip
    NT: tl.constexpr = TB * M
    pid_l = tl.program_id(0)
    pid_bk = tl.program_id(1)
    pid_c = tl.program_id(2)
    bi = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    nlines, llen, base, line_step, pos_step = _geometry(k, H, W)
    L = H * W
    j = pid_l * G + tl.arange(0, G)
    lmask = j < nlines
    line_off = base + j * line_step
    c = pid_c * CB + tl.arange(0, CB)
    cmask = c < d
    kc = k * d + c
    lc = cmask[:, None] & lmask[None, :]
    bias = tl.load(bias_ptr + kc, mask=cmask, other=0.0)[:, None]
    dsk = tl.load(dsk_ptr + kc, mask=cmask, other=0.0)[:, None]
    u_base = u_ptr + bi * su_b + c[:, None] * su_c
    dl_base = dl_ptr + bi * sd_b + k * sd_k + c[:, None] * sd_c
    g_base = g_ptr + bi * sg_b + c[:, None] * sg_c
    b_base = b_ptr + bi * sb_b + k * sb_k
    c_base = c_ptr + bi * sc_b + k * sc_k
    gb_base = gb_ptr + (bi * M * K + k) * (N * L)
    gc_base = gc_ptr + (bi * M * K + k) * (N * L)
    gu_base = gu_ptr + bi * (M * d * L) + c[:, None] * L
    gdl_base = gdl_ptr + (bi * M * K + k) * (d * L) + c[:, None] * L
    st_off = (pid_bk.to(tl.int64) * NL + j[None, :]) * (d * N) + c[:, None] * N
    ck_off = (pid_bk.to(tl.int64) * NL + j[None, :]) * (NBLK * d * N) + c[:, None] * N
    part = (pid_bk.to(tl.int64) * NLG + pid_l) * d + c
    nblk = (llen + TB - 1) // TB
    trip = tl.where(pid_l * G < nlines, nblk, 0)
    gd_acc = tl.zeros([CB, G], tl.float32)
    gbias_acc = tl.zeros([CB, G], tl.float32)
    for ib in range(0, trip):
        blk = nblk - 1 - ib
        P, V = _block_positions(blk * TB, line_off, lmask, llen, pos_step, TB)
        DT = tl.tuple([])
        DTU = tl.tuple([])
        GY = tl.tuple([])
        GA = tl.tuple([])  # sum_n A g (h - x) per token, stored last token first
        GB = tl.tuple([])  # sum_n g B per token, stored last token first
        for s in tl.static_range(TB):
            m2 = cmask[:, None] & V[s][None, :]
            for m in tl.static_range(M):
                dl = tl.load(dl_base + m * sd_m + P[s][None, :] * sd_l, mask=m2, other=0.0).to(tl.float32)
                uu = tl.load(u_base + m * su_m + P[s][None, :] * su_l, mask=m2, other=0.0).to(tl.float32)
                gy = tl.load(g_base + m * sg_m + P[s][None, :] * sg_l, mask=m2, other=0.0).to(tl.float32)
                dt = tl.where(m2, _softplus(dl + bias), 0.0)
                DT = DT + (dt,)
                DTU = DTU + (dt * uu,)
                GY = GY + (gy,)
                gd_acc += gy * uu
                GA = GA + (tl.zeros([CB, G], tl.float32),)
                GB = GB + (tl.zeros([CB, G], tl.float32),)
        for n in tl.static_range(N):
            a2 = tl.load(a2_ptr + kc * N + n, mask=cmask, other=0.0)[:, None]
            h = tl.load(ck_ptr + ck_off + blk * (d * N) + n, mask=lc, other=0.0)
            gnext = tl.load(q_ptr + st_off + n, mask=lc, other=0.0)
            HS = tl.tuple([])
            AS = tl.tuple([])
            BS = tl.tuple([])
            for s in tl.static_range(TB):
                for m in tl.static_range(M):
                    t: tl.constexpr = s * M + m
                    bv = tl.load(b_base + m * sb_m + n * sb_n + P[s] * sb_l, mask=V[s], other=0.0)
                    bv = bv.to(tl.float32)[None, :]
                    a = tl.exp2(DT[t] * a2)
                    h = a * h + DTU[t] * bv
                    HS = HS + (h,)
                    AS = AS + (a,)
                    BS = BS + (bv,)
            GA2 = tl.tuple([])
            GB2 = tl.tuple([])
            gacc = tl.zeros([CB, G], tl.float32)
            for q in tl.static_range(NT):
                t: tl.constexpr = NT - 1 - q
                s: tl.constexpr = t // M
                m: tl.constexpr = t % M
                cv = tl.load(c_base + m * sc_m + n * sc_n + P[s] * sc_l, mask=V[s], other=0.0)
                g = GY[t] * cv.to(tl.float32)[None, :] + gnext
                r = HS[t] - DTU[t] * BS[t]  # = a_t h_{t-1}
                gr = g * r
                GA2 = GA2 + (GA[q] + gr * (a2 * LN2),)
                GB2 = GB2 + (GB[q] + g * BS[t],)
                gacc += gr * DT[t]
                off_n = m * (K * N * L) + n * L + P[s]
                tl.atomic_add(gb_base + off_n, tl.sum(g * DTU[t], axis=0), mask=V[s], sem="relaxed")
                tl.atomic_add(gc_base + off_n, tl.sum(GY[t] * HS[t], axis=0), mask=V[s], sem="relaxed")
                gnext = AS[t] * g
            GA = GA2
            GB = GB2
            tl.store(q_ptr + st_off + n, gnext, mask=lc)
            ga_old = tl.load(ga_ptr + part * N + n, mask=cmask, other=0.0)
            tl.store(ga_ptr + part * N + n, ga_old + tl.sum(gacc, axis=1), mask=cmask)
        for s in tl.static_range(TB):
            m2 = cmask[:, None] & V[s][None, :]
            for m in tl.static_range(M):
                t: tl.constexpr = s * M + m
                q: tl.constexpr = NT - 1 - t
                dl = tl.load(dl_base + m * sd_m + P[s][None, :] * sd_l, mask=m2, other=0.0).to(tl.float32)
                uu = tl.load(u_base + m * su_m + P[s][None, :] * su_l, mask=m2, other=0.0).to(tl.float32)
                gu = DT[t] * GB[q] + dsk * GY[t]
                tl.atomic_add(gu_base + m * (d * L) + P[s][None, :], gu, mask=m2, sem="relaxed")
                gdl = tl.where(m2, (uu * GB[q] + GA[q]) * _sigmoid(dl + bias), 0.0)
                tl.store(gdl_base + m * (K * d * L) + P[s][None, :], gdl, mask=m2)
                gbias_acc += gdl
    tl.store(gdsk_ptr + part, tl.sum(gd_acc, axis=1), mask=cmask)
    tl.store(gbias_ptr + part, tl.sum(gbias_acc, axis=1), mask=cmask)


# ------------------------------------------------------------------------- host


def _check(u, delta, A, B, C, D, delta_bias, height: int, width: int) -> None:
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias}
    if u.dim() != 4:
        raise ValueError(f"u must be (b, M, d, L), got shape {tuple(u.shape)}")
    b, M, d, L = u.shape
    if delta.dim() != 5 or delta.shape[:2] != (b, M) or delta.shape[3:] != (d, L):
        raise ValueError(f"delta must be (b, M, K, d, L) = ({b}, {M}, K, {d}, {L}), got {tuple(delta.shape)}")
    K = delta.shape[2]
    if not 1 <= K <= 4:
        raise ValueError(f"the number of scan directions K must be 1..4, got {K}")
    if A.dim() != 2 or A.shape[0] != K * d:
        raise ValueError(f"A must be (K*d, N) = ({K * d}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, M, K, N, L):
            raise ValueError(f"{name} must be (b, M, K, N, L) = {(b, M, K, N, L)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if tuple(t.shape) != (K * d,):
            raise ValueError(f"{name} must be (K*d,) = ({K * d},), got {tuple(t.shape)}")
    if height * width != L:
        raise ValueError(f"height*width = {height}*{width} = {height * width} does not match L = {L}")
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"the triton scan backend takes float32, bfloat16 or float16 tensors; {name} is {t.dtype} "
                "(use backend='reference' for other dtypes)"
            )
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}; put every input on one device")


def _grid(lines: int, b: int, K: int, d: int, cb: int) -> tuple[int, int, int]:
    return (triton.cdiv(lines, 32 * NUM_WARPS), b * K, triton.cdiv(d, cb))


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
        tb = max(1, FWD_STEPS // M)
        grid = _grid(NL, b, K, d, FWD_CB)
        state = torch.empty(b * K, NL, d, N, device=dev, dtype=f32)
        dts = torch.empty(b * K, NL, d, device=dev, dtype=f32)
        strides = (*u.stride(), *delta.stride(), *B.stride(), *C.stride())
        consts = dict(K=K, M=M, N=N, CB=FWD_CB, G=32 * NUM_WARPS, TB=tb, num_warps=NUM_WARPS)
        _fwd_kernel[grid](u, delta, a2, B, C, dsk, bias, state, dts, state, H, W, NL, 0, d, *strides,
                          WITH_Y=False, **consts)  # fmt: skip
        save = any(ctx.needs_input_grad[:7])
        start = torch.empty_like(state)
        saved_start = torch.empty_like(state) if save else start
        _line_combine_kernel[(b * K, triton.cdiv(d * N, COMBINE_STATES))](
            state, dts, a2, start, saved_start, H, W, NL, d,
            K=K, N=N, REVERSE=False, SAVE2=save, JB=COMBINE_LINES, SB=COMBINE_STATES, num_warps=1,
        )  # fmt: skip
        out = torch.zeros(b, M, d, L, device=dev, dtype=f32)
        _fwd_kernel[grid](u, delta, a2, B, C, dsk, bias, start, dts, out, H, W, NL, 0, d, *strides,
                          WITH_Y=True, **consts)  # fmt: skip
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, saved_start, dts)
            ctx.hw = (H, W)
        return out if u.dtype == f32 else out.to(u.dtype)

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        u, delta, A, B, C, D, delta_bias, start, dts = ctx.saved_tensors
        H, W = ctx.hw
        b, M, d, L = u.shape
        K, N = delta.shape[2], A.shape[1]
        dev, f32 = u.device, torch.float32
        a2 = (A.detach().to(f32) * LOG2E).contiguous()
        dsk = D.detach().to(f32).contiguous()
        bias = delta_bias.detach().to(f32).contiguous()
        NL = max(H, W)
        tb = max(1, BWD_STEPS // M)
        nblk = triton.cdiv(NL, tb)
        grid = _grid(NL, b, K, d, BWD_CB)
        nlg = grid[0]
        consts = dict(K=K, M=M, N=N, CB=BWD_CB, G=32 * NUM_WARPS, TB=tb, num_warps=NUM_WARPS)
        strides = (*u.stride(), *delta.stride(), *B.stride(), *C.stride(), *gout.stride())
        ck = torch.empty(b * K, NL, nblk, d, N, device=dev, dtype=f32)
        prod = torch.empty_like(start)
        local = torch.empty_like(start)
        _bwd_sweep_kernel[grid](u, delta, a2, B, C, bias, gout, start, ck, prod, local, H, W, NL, nblk, d,
                                *strides, **consts)  # fmt: skip
        del prod
        arriving = torch.empty_like(start)
        _line_combine_kernel[(b * K, triton.cdiv(d * N, COMBINE_STATES))](
            local, dts, a2, arriving, arriving, H, W, NL, d,
            K=K, N=N, REVERSE=True, SAVE2=False, JB=COMBINE_LINES, SB=COMBINE_STATES, num_warps=1,
        )  # fmt: skip
        del local
        g_delta = torch.empty(b, M, K, d, L, device=dev, dtype=delta.dtype)
        g_u = torch.zeros(b, M, d, L, device=dev, dtype=f32)
        g_B = torch.zeros(b, M, K, N, L, device=dev, dtype=f32)
        g_C = torch.zeros(b, M, K, N, L, device=dev, dtype=f32)
        g_A = torch.zeros(b * K, nlg, d, N, device=dev, dtype=f32)
        g_D = torch.empty(b * K, nlg, d, device=dev, dtype=f32)
        g_bias = torch.empty(b * K, nlg, d, device=dev, dtype=f32)
        _bwd_kernel[grid](u, delta, a2, B, C, dsk, bias, gout, ck, arriving, g_delta, g_u, g_B, g_C, g_A, g_D,
                          g_bias, H, W, NL, nblk, nlg, d, *strides, **consts)  # fmt: skip
        g_A = g_A.view(b, K, nlg, d, N).sum((0, 2)).reshape(K * d, N)
        g_D = g_D.view(b, K, nlg, d).sum((0, 2)).reshape(K * d)
        g_bias = g_bias.view(b, K, nlg, d).sum((0, 2)).reshape(K * d)
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
