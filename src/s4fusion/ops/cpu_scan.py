"""Fast CPU backend of :func:`s4fusion.ops.cross_scan` and
:func:`s4fusion.ops.cross_scan_state` (numba kernels).

Same semantics and layouts as :func:`s4fusion.ops.reference.cross_scan_ref`
(the specification): map layout in, map layout out, four scan directions
(row-major, column-major and their reversals), modalities interleaved per
direction (token ``t`` of modality ``m`` is step ``t * M + m``), and the outputs
of the directions summed back at their row-major positions.

How it runs:

* One work unit = (batch element, direction k, block of channels). A unit walks
  its direction's positions in chunks of ``_CHUNK`` positions; a chunk's inputs
  are gathered by index arithmetic (position of step ``i`` of direction ``k``)
  from the map-layout tensors into small unit-local buffers, scanned, and the
  results scattered back to row-major positions. No unfolded, interleaved or
  per-direction copy of the inputs is made.
* The recurrence is vectorised over the channels of the block (SIMD lanes) with
  the state index ``n`` and the steps sequential, so every sum is in a fixed
  order (``fastmath`` is off; multiply-adds are explicit IEEE fused
  multiply-adds). In float32 the exponentials and the softplus are evaluated with
  the polynomial helpers below (exp within 0.6 ulp, softplus within 2 ulp; the C
  library calls would not vectorise); in float64 with the C library. When every
  entry of ``A`` is <= 0 (a decaying state, as in the network), the decay
  factors exp(dt A) use a float32 exponential without the handling of large
  positive arguments (bitwise the same values, 15% less time per state update);
  the choice is made when a kernel is compiled (``_exps``), so each kernel has a
  second compiled variant for other ``A``.
* The recovery sum: each direction writes its own output slice; the slices are
  then summed and the ``D`` skip of the four directions added.
* The work units run on ``torch.get_num_threads()`` threads, each taking the
  next unit when done: a thread pool calls the numba functions, which release
  the GIL. (``parallel=True`` would compile
  the unit body a second time through numba's parfor passes, about tripling the
  first-use compile time, for the same split of the work.)
* State in float32 for float32/bfloat16/float16 inputs (computed in float32,
  returned in the input dtype), in float64 for float64 inputs.
* Backward: reverse-time recurrence. When gradients are needed, the forward
  stores the state at the start of every chunk (``N / (_CHUNK * M)`` of the size
  of ``delta``); the backward recomputes the states of one chunk at a time from
  it. Under ``torch.no_grad()`` (or when no input requires grad) nothing is stored.
* The state op (one direction from a given state, returning the final state)
  runs the same forward kernel with one direction (K = 1), its state loaded
  from ``h0`` and its final state stored, and no D skip.
* Compiled code is cached on disk by numba (``cache=True``): the first use on a
  machine compiles for some seconds per dtype (float32, float64) and kind of
  ``A``, later processes load it.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .reference import check_cross_scan_args, check_cross_scan_state_args

__all__ = ["cross_scan_cpu", "cross_scan_state_cpu"]

_CHUNK = 64  # positions per chunk (a chunk has _CHUNK * M scan steps)
_MAX_BLOCK = 32  # channels per work unit (SIMD lanes of the recurrence), at most
_LANES = 8  # channel blocks are multiples of this (one AVX2 float32 vector)

# ---------------------------------------------------------------- float32 math
# exp: x = k ln2 + r, |r| <= ln2 / 2 (Cody-Waite split of ln2), exp(r) by its
# degree-7 Taylor polynomial (truncation < 0.1 ulp), times 2^k built from the
# exponent bits. Results below 2^-126 are flushed to zero.
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_F0 = np.float32(0.0)
_HALF = np.float32(0.5)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.33654)  # ln(2^-126)
_EXP_HI = np.float32(88.72283)  # ln(FLT_MAX)
_K_MAX = np.float32(127.0)
_INF = np.float32(np.inf)
_T2, _T3, _T4, _T5, _T6, _T7 = (np.float32(1.0 / math.factorial(i)) for i in range(2, 8))
# log1p(z) = 2 atanh(s), s = z / (2 + z) in [0, 1/3] for z in [0, 1]: odd series
# up to s^17 (truncation < 2e-9 relative).
_S3, _S5, _S7, _S9, _S11, _S13, _S15, _S17 = (np.float32(1.0 / i) for i in range(3, 18, 2))
_SOFTPLUS_THRESHOLD = 20.0  # as torch.nn.functional.softplus: x above it -> x
_THR32 = np.float32(_SOFTPLUS_THRESHOLD)


_NEG_LN2_HI = np.float32(-0.693359375)
_NEG_LN2_LO = np.float32(2.12194440e-4)


@intrinsic
def _int32_bits_as_float32(typingctx, i):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma: IEEE fused multiply-add, vectorisable)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


@njit(inline="always", error_model="numpy", cache=True)
def _exp_reduced(xc):
    """(kf, p) with exp(xc) = p * 2^kf, for xc in [_EXP_LO, _EXP_HI]: kf = round(xc / ln2),
    p = exp(xc - kf ln2) by the polynomial."""
    kf = np.floor(_fma(xc, _LOG2E, _HALF))
    r = _fma(kf, _NEG_LN2_HI, xc)
    r = _fma(kf, _NEG_LN2_LO, r)
    p = _fma(_fma(_fma(_fma(_fma(_fma(_fma(_T7, r, _T6), r, _T5), r, _T4), r, _T3), r, _T2), r, _F1), r, _F1)
    return kf, p


@njit(inline="always", error_model="numpy", cache=True)
def _pow2(kf):
    """2^kf for a whole kf in [-126, 127], from the exponent bits."""
    return _int32_bits_as_float32((np.int32(kf) + np.int32(127)) << np.int32(23))


@njit(inline="always", error_model="numpy", cache=True)
def _expf(x):
    xc = x
    if xc < _EXP_LO:
        xc = _EXP_LO
    if xc > _EXP_HI:
        xc = _EXP_HI
    kf, p = _exp_reduced(xc)
    if kf > _K_MAX:  # only near ln(FLT_MAX): 2^128 is not a float32, use 2 * 2^127
        p = p * _F2
        kf = _K_MAX
    res = p * _pow2(kf)
    if x < _EXP_LO:
        res = _F0
    if x > _EXP_HI:
        res = _INF
    if x != x:
        res = x
    return res


@njit(inline="always", error_model="numpy", cache=True)
def _expf_decay(x):
    """exp(x) for x <= 0 or NaN, bitwise as :func:`_expf` there, in fewer instructions:
    without the handling of large positive x (the recurrence's decay factors, exp(dt A)
    with dt >= 0 and A <= 0; a positive x gives a wrong result)."""
    xc = x
    if xc < _EXP_LO:
        xc = _EXP_LO
    kf, p = _exp_reduced(xc)
    res = p * _pow2(kf)
    if x < _EXP_LO:
        res = _F0
    if x != x:
        res = x
    return res


@njit(inline="always", error_model="numpy", cache=True)
def _softplusf(x):
    # softplus(x) = max(x, 0) + log1p(exp(-|x|))
    z = _expf(-x if x > _F0 else x)
    s = z / (_F2 + z)
    s2 = s * s
    p = _fma(_fma(_fma(_fma(_fma(_fma(_fma(_S17, s2, _S15), s2, _S13), s2, _S11), s2, _S9), s2, _S7), s2, _S5), s2, _S3)
    res = (x if x > _F0 else _F0) + _F2 * _fma(p * s2, s, s)
    if x > _THR32:
        res = x
    return res


def _softplus(x):
    """softplus with torch's threshold (20) in the state dtype."""
    return x if x > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


def _softplus_grad(x):
    """Derivative of :func:`_softplus` (logistic function; 1 above the threshold)."""
    return 1.0 if x > _SOFTPLUS_THRESHOLD else 1.0 / (1.0 + math.exp(-x))


# The state recurrence's exponential exp(dt A) is selected when a kernel is compiled,
# by the dtype of a zero-length marker array the kernel is called with: every A <= 0
# (a decaying state, as the network's A = -exp(A_log)) makes every argument <= 0 or
# NaN, and float32 then uses _expf_decay; otherwise the general _expf.
_EXPS_DECAY = np.zeros(0, dtype=np.uint8)
_EXPS_ANY = np.zeros(0, dtype=np.int8)


def _state_exp(x, exps):
    """exp(x) of the state recurrence, x = dt * A, in the state dtype (float32: a
    vectorisable polynomial, float64: libm); ``exps`` is _EXPS_DECAY or _EXPS_ANY."""
    return math.exp(x)


def _exps(A: torch.Tensor) -> np.ndarray:
    """The marker for the kernels: _EXPS_DECAY when every entry of A is <= 0 (NaN is not)."""
    return _EXPS_DECAY if bool((A <= 0).all()) else _EXPS_ANY


def _is_f32(x) -> bool:
    return isinstance(x, types.Float) and x.bitwidth == 32


@overload(_state_exp, inline="always")
def _ov_state_exp(x, exps):
    if _is_f32(x) and isinstance(exps, types.Array) and exps.dtype == types.uint8:
        return lambda x, exps: _expf_decay(x)
    if _is_f32(x):
        return lambda x, exps: _expf(x)
    return lambda x, exps: math.exp(x)


@overload(_softplus, inline="always")
def _ov_softplus(x):
    if _is_f32(x):
        return lambda x: _softplusf(x)
    return lambda x: x if x > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


@overload(_softplus_grad)
def _ov_softplus_grad(x):
    if _is_f32(x):
        return lambda x: _F1 if x > _THR32 else _F1 / (_F1 + _expf(-x))
    return lambda x: 1.0 if x > _SOFTPLUS_THRESHOLD else 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------- index maths
@njit(inline="always", error_model="numpy", cache=True)
def _position(k, i, L, H, W):
    """Row-major position of step ``i`` of direction ``k`` (0 row-major, 1
    column-major, 2 and 3 their reversals), as ``direction_orders``."""
    if k >= 2:
        i = L - 1 - i
    if k == 1 or k == 3:
        return (i % H) * W + i // H
    return i


@njit(error_model="numpy", cache=True)
def _gather_chunk(u, delta, Bm, Cm, bias_l, bi, k, c0, cbn, pos, npos, xb, ub, Bb, Cb):
    """Copy the chunk's inputs into step-major buffers (step s = i * M + m):
    xb, ub (s, channel) = delta + bias, u; Bb, Cb (s, n)."""
    M = u.shape[1]
    N = Bm.shape[3]
    for m in range(M):
        for j in range(cbn):
            c = c0 + j
            bj = bias_l[j]
            for ii in range(npos):
                p = pos[ii]
                xb[ii * M + m, j] = delta[bi, m, k, c, p] + bj
                ub[ii * M + m, j] = u[bi, m, c, p]
        for n in range(N):
            for ii in range(npos):
                p = pos[ii]
                Bb[ii * M + m, n] = Bm[bi, m, k, n, p]
                Cb[ii * M + m, n] = Cm[bi, m, k, n, p]


def _units(b: int, K: int, d: int, threads: int) -> tuple[int, int]:
    """(channel block size, number of blocks): blocks of at most _MAX_BLOCK
    channels in multiples of _LANES, smaller when b * K * blocks would leave
    threads idle."""
    if d == 0:
        return _LANES, 0
    nblk = -(-d // _MAX_BLOCK)
    while b * K * nblk < 2 * threads and nblk * _LANES < d:
        nblk += 1
    size = -(-d // nblk)
    size = -(-size // _LANES) * _LANES
    return size, -(-d // size)


# ------------------------------------------------------------------- kernels
@njit(nogil=True, fastmath=False, error_model="numpy", cache=True)
def _forward_units(first, step, u, delta, A, Bm, Cm, bias, h_in, H, W, dir0, block, out_k, h_out, ckpt, save, exps):
    """Scan the work units first, first + step, ... of the (batch, direction,
    channel block) units; input direction k is scan direction ``dir0 + k``.

    u (b, M, d, L), delta (b, M, K, d, L), A (K*d, N), Bm, Cm (b, M, K, N, L),
    bias (K*d,), h_in (b, K*d, N) the state entering the first step ->
    out_k (b, K, M, d, L): the scan output of direction k at each row-major
    position, without the D skip; h_out (b, K*d, N): the state after the last
    step. With ``save``, ckpt (b, K, chunks, N, d) receives the state entering
    every chunk. ``exps``: the marker of the recurrence's exponential (:func:`_exps`).
    """
    b, M, d, L = u.shape
    K = delta.shape[2]
    N = A.shape[1]
    nblk = (d + block - 1) // block
    nchunks = (L + _CHUNK - 1) // _CHUNK
    steps = _CHUNK * M
    for unit in range(first, b * K * nblk, step):
        bi = unit // (K * nblk)
        k = (unit // nblk) % K
        c0 = (unit % nblk) * block
        cbn = min(block, d - c0)
        h = np.empty((N, cbn), dtype=u.dtype)
        Al = np.empty((N, cbn), dtype=u.dtype)
        bias_l = np.empty(cbn, dtype=u.dtype)
        for j in range(cbn):
            bias_l[j] = bias[k * d + c0 + j]
            for n in range(N):
                Al[n, j] = A[k * d + c0 + j, n]
                h[n, j] = h_in[bi, k * d + c0 + j, n]
        pos = np.empty(_CHUNK, dtype=np.int64)
        xb = np.empty((steps, cbn), dtype=u.dtype)
        ub = np.empty((steps, cbn), dtype=u.dtype)
        yb = np.empty((steps, cbn), dtype=u.dtype)
        dtb = np.empty((steps, cbn), dtype=u.dtype)
        dtub = np.empty((steps, cbn), dtype=u.dtype)
        Bb = np.empty((steps, N), dtype=u.dtype)
        Cb = np.empty((steps, N), dtype=u.dtype)
        xf, uf, yf = xb.reshape(steps * cbn), ub.reshape(steps * cbn), yb.reshape(steps * cbn)
        dtf, dtuf = dtb.reshape(steps * cbn), dtub.reshape(steps * cbn)
        for ch in range(nchunks):
            i0 = ch * _CHUNK
            npos = min(_CHUNK, L - i0)
            ns = npos * M
            if save:
                for n in range(N):
                    for j in range(cbn):
                        ckpt[bi, k, ch, n, c0 + j] = h[n, j]
            for ii in range(npos):
                pos[ii] = _position(dir0 + k, i0 + ii, L, H, W)
            _gather_chunk(u, delta, Bm, Cm, bias_l, bi, k, c0, cbn, pos, npos, xb, ub, Bb, Cb)
            for q in range(ns * cbn):
                dtq = _softplus(xf[q])
                dtf[q] = dtq
                dtuf[q] = dtq * uf[q]
                yf[q] = 0
            for s in range(ns):
                dt = dtb[s]
                dtu = dtub[s]
                ys = yb[s]
                for n in range(N):
                    bn = Bb[s, n]
                    cn = Cb[s, n]
                    hn = h[n]
                    an = Al[n]
                    for j in range(cbn):
                        hv = _fma(_state_exp(dt[j] * an[j], exps), hn[j], dtu[j] * bn)
                        hn[j] = hv
                        ys[j] = _fma(hv, cn, ys[j])
            for m in range(M):
                for j in range(cbn):
                    for ii in range(npos):
                        out_k[bi, k, m, c0 + j, pos[ii]] = yb[ii * M + m, j]
        for j in range(cbn):
            for n in range(N):
                h_out[bi, k * d + c0 + j, n] = h[n, j]


@njit(nogil=True, fastmath=False, error_model="numpy", cache=True)
def _backward_units(
    first, step, u, delta, A, Bm, Cm, bias, dout, H, W, block, groups, ckpt, du_k, ddelta, dA_part, dB_part, dC_part,
    exps,
):
    """Gradients of the scan part (the D skip is handled outside) for the work
    units first, first + step, ... of the (batch, direction, group) units; group g
    handles channel blocks g, g + groups, ... and accumulates its dB, dC
    contribution in slot g.

    Inputs as :func:`_forward_units` (``exps`` too), dout (b, M, d, L), ckpt from the forward.
    Outputs: du_k (b, K, M, d, L) per direction, ddelta (b, M, K, d, L),
    dA_part (b, K*d, N), dB_part, dC_part (groups, b, M, K, N, L) zero-filled on
    entry.
    """
    b, M, d, L = u.shape
    K = delta.shape[2]
    N = A.shape[1]
    nblk = (d + block - 1) // block
    nchunks = (L + _CHUNK - 1) // _CHUNK
    steps = _CHUNK * M
    for unit in range(first, b * K * groups, step):
        bi = unit // (K * groups)
        k = (unit // groups) % K
        g = unit % groups
        pos = np.empty(_CHUNK, dtype=np.int64)
        xb = np.empty((steps, block), dtype=u.dtype)
        ub = np.empty((steps, block), dtype=u.dtype)
        dtb = np.empty((steps, block), dtype=u.dtype)
        dtub = np.empty((steps, block), dtype=u.dtype)
        dyb = np.empty((steps, block), dtype=u.dtype)
        Bb = np.empty((steps, N), dtype=u.dtype)
        Cb = np.empty((steps, N), dtype=u.dtype)
        hb = np.empty((steps + 1, N, block), dtype=u.dtype)
        ab = np.empty((steps, N, block), dtype=u.dtype)
        gBb = np.empty((steps, N, block), dtype=u.dtype)
        gCb = np.empty((steps, N, block), dtype=u.dtype)
        ddt = np.empty(block, dtype=u.dtype)
        dus = np.empty(block, dtype=u.dtype)
        for blk in range(g, nblk, groups):
            c0 = blk * block
            cbn = min(block, d - c0)
            Al = np.empty((N, cbn), dtype=u.dtype)
            bias_l = np.empty(cbn, dtype=u.dtype)
            for j in range(cbn):
                bias_l[j] = bias[k * d + c0 + j]
                for n in range(N):
                    Al[n, j] = A[k * d + c0 + j, n]
            carry = np.zeros((N, cbn), dtype=u.dtype)  # a_{s+1} * dL/dh_{s+1}
            dA_chunk = np.empty((N, cbn), dtype=u.dtype)
            dA_total = np.zeros((N, cbn), dtype=np.float64)
            for ch in range(nchunks - 1, -1, -1):
                i0 = ch * _CHUNK
                npos = min(_CHUNK, L - i0)
                ns = npos * M
                for ii in range(npos):
                    pos[ii] = _position(k, i0 + ii, L, H, W)
                _gather_chunk(u, delta, Bm, Cm, bias_l, bi, k, c0, cbn, pos, npos, xb, ub, Bb, Cb)
                for m in range(M):
                    for j in range(cbn):
                        for ii in range(npos):
                            dyb[ii * M + m, j] = dout[bi, m, c0 + j, pos[ii]]
                # recompute the chunk's states from the stored entering state
                for n in range(N):
                    for j in range(cbn):
                        hb[0, n, j] = ckpt[bi, k, ch, n, c0 + j]
                for s in range(ns):
                    dt = dtb[s]
                    dtu = dtub[s]
                    for j in range(cbn):
                        dt[j] = _softplus(xb[s, j])
                        dtu[j] = dt[j] * ub[s, j]
                    for n in range(N):
                        bn = Bb[s, n]
                        an = Al[n]
                        a_s = ab[s, n]
                        h0 = hb[s, n]
                        h1 = hb[s + 1, n]
                        for j in range(cbn):
                            a = _state_exp(dt[j] * an[j], exps)
                            a_s[j] = a
                            h1[j] = _fma(a, h0[j], dtu[j] * bn)
                # reverse-time recurrence
                dA_chunk[:, :] = 0
                for s in range(ns - 1, -1, -1):
                    for j in range(cbn):
                        ddt[j] = 0
                        dus[j] = 0
                    for n in range(N):
                        bn = Bb[s, n]
                        cn = Cb[s, n]
                        for j in range(cbn):
                            dy = dyb[s, j]
                            gs = _fma(dy, cn, carry[n, j])
                            a = ab[s, n, j]
                            gha = gs * hb[s, n, j] * a
                            dtv = dtb[s, j]
                            uv = ub[s, j]
                            ddt[j] = _fma(gha, Al[n, j], _fma(gs * uv, bn, ddt[j]))
                            dA_chunk[n, j] = _fma(gha, dtv, dA_chunk[n, j])
                            dus[j] = _fma(gs * dtv, bn, dus[j])
                            gBb[s, n, j] = gs * dtub[s, j]
                            gCb[s, n, j] = dy * hb[s + 1, n, j]
                            carry[n, j] = a * gs
                    for j in range(cbn):
                        xb[s, j] = ddt[j] * _softplus_grad(xb[s, j])  # d loss / d delta
                        ub[s, j] = dus[j]
                for n in range(N):
                    for j in range(cbn):
                        dA_total[n, j] += dA_chunk[n, j]
                for m in range(M):
                    for j in range(cbn):
                        c = c0 + j
                        for ii in range(npos):
                            p = pos[ii]
                            ddelta[bi, m, k, c, p] = xb[ii * M + m, j]
                            du_k[bi, k, m, c, p] = ub[ii * M + m, j]
                    for n in range(N):
                        for ii in range(npos):
                            s = ii * M + m
                            sb = gBb[s, n, 0]
                            sc = gCb[s, n, 0]
                            for j in range(1, cbn):
                                sb += gBb[s, n, j]
                                sc += gCb[s, n, j]
                            p = pos[ii]
                            dB_part[g, bi, m, k, n, p] += sb
                            dC_part[g, bi, m, k, n, p] += sc
            for j in range(cbn):
                for n in range(N):
                    dA_part[bi, k * d + c0 + j, n] = dA_total[n, j]


# ------------------------------------------------------------------- wrapper
def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist (and the lock may
    have been held by one of them): start afresh."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _run_units(fn: Callable, units: int, *args) -> None:
    """Runs work units 0 .. units - 1 as ``fn(unit, units, *args)`` (``fn(first,
    step, ...)`` does units first, first + step, ...) on min(units,
    torch.get_num_threads()) threads, the calling thread included; each thread
    takes the next unit when it is done with one, so a core that is slowed down
    (other processes) does not hold the others up. The numba functions release
    the GIL. Units write disjoint outputs: the result does not depend on the
    schedule."""
    global _pool, _pool_size
    workers = max(1, min(units, torch.get_num_threads()))
    if workers == 1:
        fn(0, 1, *args)
        return
    with _pool_lock:
        if _pool is None or _pool_size < workers - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="s4fusion-scan")
            _pool_size = workers - 1
        pool = _pool
    todo = iter(range(units))
    take = threading.Lock()

    def work() -> None:
        while True:
            with take:
                unit = next(todo, None)
            if unit is None:
                return
            fn(unit, units, *args)

    futures = [pool.submit(work) for _ in range(workers - 1)]
    work()
    for f in futures:
        f.result()


def _check_on_cpu(op: str, named: tuple) -> None:
    for name, t in named:
        if t.device.type != "cpu":
            raise ValueError(f"{op} (cpu backend): {name} is on {t.device}, expected the CPU")
        if not t.is_floating_point():
            raise ValueError(f"{op} (cpu backend): {name} must be a floating tensor, got {t.dtype}")


def _check(u, delta, A, B, C, D, delta_bias, height: int, width: int) -> None:
    check_cross_scan_args(u, delta, A, B, C, D, delta_bias, height, width)
    named = (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("delta_bias", delta_bias))
    _check_on_cpu("cross_scan", named)


def _scan_units(u, delta, A, B, C, delta_bias, h0, height, width, dir0, save):
    """Runs the forward kernel on state-dtype tensors (any strides), shapes as
    :func:`_forward_units`. Returns (out_k, h_last, ckpt)."""
    b, M, d, L = u.shape
    K, N = delta.shape[2], A.shape[1]
    block, nblk = _units(b, K, d, torch.get_num_threads())
    nchunks = -(-L // _CHUNK)
    out_k = torch.empty(b, K, M, d, L, dtype=u.dtype)
    h_last = torch.empty(b, K * d, N, dtype=u.dtype)
    ckpt = torch.empty((b, K, nchunks, N, d) if save else (1, 1, 1, 1, 1), dtype=u.dtype)
    _run_units(
        _forward_units, b * K * nblk,
        _np(u), _np(delta), _np(A), _np(B), _np(C), _np(delta_bias), _np(h0), height, width, dir0, block,
        _np(out_k), _np(h_last), _np(ckpt), save, _exps(A),
    )  # fmt: skip
    return out_k, h_last, ckpt


def _scan_forward(u, delta, A, B, C, D, delta_bias, height, width, save):
    """Runs the kernels on state-dtype tensors (any strides). Returns (out, ckpt)."""
    b, d, K, N = u.shape[0], u.shape[2], delta.shape[2], A.shape[1]
    h0 = torch.zeros(b, K * d, N, dtype=u.dtype)
    out_k, _, ckpt = _scan_units(u, delta, A, B, C, delta_bias, h0, height, width, 0, save)
    return _recover(out_k, u, D), ckpt


def _recover(per_direction: torch.Tensor, x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The recovery sum: per_direction (b, K, M, d, L) summed over K, plus the
    D skip of every direction, (sum_k D[k*d + c]) * x (b, M, d, L)."""
    K, d = per_direction.shape[1], per_direction.shape[3]
    return per_direction.sum(1).addcmul_(x, D.view(K, d).sum(0).view(1, 1, d, 1))


class _CrossScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, height, width):
        sd = _state_dtype(u.dtype)
        ctx.dtypes = tuple(t.dtype for t in (u, delta, A, B, C, D, delta_bias))
        ts = tuple(t.detach().to(sd) for t in (u, delta, A, B, C, D, delta_bias))
        out, ckpt = _scan_forward(*ts, height, width, save=True)
        ctx.save_for_backward(*ts, ckpt)
        ctx.hw = (height, width)
        return out.to(u.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, delta_bias, ckpt = ctx.saved_tensors
        height, width = ctx.hw
        b, M, d, L = u.shape
        K, N = delta.shape[2], A.shape[1]
        dout = grad_out.detach().to(u.dtype).contiguous()
        threads = torch.get_num_threads()
        block, nblk = _units(b, K, d, threads)
        groups = max(1, min(nblk, -(-2 * threads // (b * K))))
        du_k = torch.empty(b, K, M, d, L, dtype=u.dtype)
        ddelta = torch.empty_like(delta)
        dA_part = torch.empty(b, K * d, N, dtype=u.dtype)
        dB_part = torch.zeros(groups, b, M, K, N, L, dtype=u.dtype)
        dC_part = torch.zeros(groups, b, M, K, N, L, dtype=u.dtype)
        _run_units(
            _backward_units, b * K * groups,
            _np(u), _np(delta), _np(A), _np(B), _np(C), _np(delta_bias), _np(dout), height, width, block, groups,
            _np(ckpt), _np(du_k), _np(ddelta), _np(dA_part), _np(dB_part), _np(dC_part), _exps(A),
        )  # fmt: skip
        du = _recover(du_k, dout, D)
        dD = (dout * u).sum(dim=(0, 1, 3)).repeat(K)
        grads = (
            du,
            ddelta,
            dA_part.sum(0),
            dB_part.sum(0),
            dC_part.sum(0),
            dD,
            ddelta.sum(dim=(0, 1, 4)).reshape(K * d),
        )
        out = tuple(
            g.to(dt) if need else None for g, dt, need in zip(grads, ctx.dtypes, ctx.needs_input_grad[:7])
        )
        return out + (None, None)


def cross_scan_cpu(
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
    """SS2D (M = 1) or Cross SS2D (M = 2) scan core on the CPU, map layout.

    Args and result exactly as :func:`s4fusion.ops.reference.cross_scan_ref`:
    u (b, M, d, L), delta (b, M, K, d, L), A (K*d, N), B, C (b, M, K, N, L),
    D, delta_bias (K*d,) -> (b, M, d, L) in ``u.dtype``. Differentiable in every
    tensor input.
    """
    _check(u, delta, A, B, C, D, delta_bias, height, width)
    inputs = (u, delta, A, B, C, D, delta_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _CrossScanCPU.apply(*inputs, height, width)
    sd = _state_dtype(u.dtype)
    ts = tuple(t.detach().to(sd) for t in inputs)
    out, _ = _scan_forward(*ts, height, width, save=False)
    return out.to(u.dtype)


def cross_scan_state_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor,
    height: int,
    width: int,
    direction: int,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scan direction from a given state on the CPU, map layout (inference only).

    Args and results exactly as :func:`s4fusion.ops.reference.cross_scan_state_ref`:
    u, delta (b, M, d, L), A (d, N), B, C (b, M, N, L), delta_bias (d,), direction
    0..3, h0 (b, d, N) -> y (b, M, d, L) in ``u.dtype`` (no D skip), h_last
    (b, d, N) in the state dtype.
    """
    check_cross_scan_state_args(u, delta, A, B, C, delta_bias, height, width, direction, h0)
    named = (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("delta_bias", delta_bias), ("h0", h0))
    _check_on_cpu("cross_scan_state", named)
    sd = _state_dtype(u.dtype)
    u_, delta_, A_, B_, C_, bias_, h0_ = (t.detach().to(sd) for _, t in named)
    out_k, h_last, _ = _scan_units(
        u_, delta_[:, :, None], A_, B_[:, :, None], C_[:, :, None], bias_, h0_, height, width, int(direction), False
    )
    return out_k[:, 0].to(u.dtype), h_last
