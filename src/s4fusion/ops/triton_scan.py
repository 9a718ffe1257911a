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
* Forward pass 1 (``_fwd_kernel``, ``MODE_END``): every chunk from a zero
  state, all in parallel: the chunk's end state and its sum of steps dt.
* Pass 2 (``_chunk_combine_kernel``): a scan over the chunks of each direction
  gives every chunk its true start state (a chunk decays a state by
  ``exp(A * sum dt)``).
* Pass 3 (``_fwd_kernel``, ``MODE_Y``): every chunk again from its start
  state; ``y = C.h + D u`` is added atomically (float32) at its row-major
  position, so the K directions sum in place.
* Without gradients, :func:`cross_scan_lowrank_triton` runs passes 1 and 3 on the
  low-rank delta (``LOWR``): each lane up-projects its channel's delta at every step
  from the line's R low-rank values (read as B and C are) and its channel's R weights
  (in registers), so the (b, M, K, d, L) delta is never materialised.
* Backward: ``_fwd_kernel`` (``MODE_SWEEP``) walks every chunk again from its
  start state and stores the state entering each block of ``TB`` steps (in
  bfloat16 for bfloat16 inputs: ``_checkpoint_dtype``) and the
  adjoint the chunk passes to the state before it (from its own outputs). For
  bfloat16 inputs, where autograd records the scan, pass 3 stores those block
  states already (``CK``) and the backward's walk computes the adjoints only
  (``MODE_ADJOINT``: ``_keeps_checkpoints``);
  ``_chunk_combine_kernel`` (reversed) gives every chunk the adjoint arriving
  from the chunks after it; ``_bwd_kernel`` walks the blocks
  of every chunk backwards, recomputes each block's states from the stored ones
  and runs the adjoint back through them. Gradients: u (over directions), B and
  C (over channels) atomically; delta stored; A, D and delta_bias as partial
  sums added atomically into ``PART_SLOTS`` slots that torch reduces.

Work layout: a program owns ``E`` lanes of one segment of one direction and
batch element; a lane is one line and ``CB`` neighbouring channels (``CB`` is a
launch constant of each pass: ``FWD_CB``, ``SWEEP_CB``, ``BWD_CB``). Lanes of one
line are neighbours, so at every step a warp reads the channels of a few
positions: coalesced for every direction when the channels are innermost in
memory, the layout the network passes (the output and the gradients of u and
delta have their input's layout; dL/dy is read the same way, and the network
hands it over with its channels innermost). B and C are read once per line and
step and shared by the line's lanes. The forward modes keep the
``N`` states of each channel in registers (``N`` is a compile-time constant).
In ``_bwd_kernel`` ``G`` neighbouring lanes (a group) share a line and ``CB``
channels and split their states, every G-th (``N / G`` each, rounded up): a lane
keeps its states' adjoints and dL/dA partials in registers for the whole chunk, and
over a block of ``TB * M`` tokens their states and decays. Sums over the states (for
the gradients of u and delta) go over the group, sums over the channels (dL/dB and
dL/dC) over a lane's ``CB`` channels and then over ``CT`` groups of the line, both
by a halving exchange of warp shuffles that leaves each lane with different sums
(``_sum_scatter``), so that only ``d / (CB * CT)`` atomic adds reach each element
of dL/dB and dL/dC, issued by all lanes at once. dL/dB and dL/dC of one token and
state are neighbours in one buffer and added together, by one vector reduction, on
GPUs that have them (elsewhere one value at a time; these adds cost by their number:
``RED_*``, BENCHMARKS.md session 20). A
launch's grid covers the lines of the longest image side for every direction;
programs whose lanes all lie past their direction's last line return at once.

Every load stays inside its tensor: loads are masked, except the forward modes'
loads of B and C. There a lane past the last line reads the last line, and a step
past the segment's end reads the segment's current step (both in bounds for any
strides; such a step's dt is 0 and its results are masked, so the values are
unused). Masks there cost 9-11% of a forward loop iteration's instructions. (Loads
issued one iteration ahead are masked past the segment's end: the last iteration's
are never used.) Where B and C are laid out as the network's projection lays them
out (``ops.projection_rows``: state stride 1, 16-byte aligned), the forward modes
read a token's states with 16-byte vector loads, float32 values or bfloat16 pairs
(``VEC``); one load per state otherwise.

``H``, ``W``, ``SEG`` and the size-dependent strides are runtime values that are
not specialised on: one compiled kernel per dtype, M, N and block shape serves
every image size (and layout, apart from whether channels and states are innermost:
``_UNIT_STRIDES``).
"""

from __future__ import annotations

import inspect
import math
import os

import torch
import triton
import triton.language as tl

from .grad_buffers import sibling_gradients
from .reference import autocast_dtype, check_cross_scan_args, check_cross_scan_lowrank_args
from .triton_grid import launch_device
from .triton_proj import dt_project_triton

__all__ = ["cross_scan_lowrank_triton", "cross_scan_triton"]

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
LOG2E_F = tl.constexpr(LOG2E)
# One-instruction exp2 and reciprocal (PTX ex2.approx.ftz, rcp.approx.ftz: results
# below 2**-126 flush to zero); the Triton interpreter (TRITON_INTERPRET=1, used to
# check the kernels on a CPU) has no inline PTX and uses tl.exp2 and a division.
FAST_MATH = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")

# Launch configuration.
# Forward: neighbouring channels per lane (one line each) for M = 1 and for M = 2
# (more channels share a step's B and C loads but need more registers, and give fewer
# lanes), lanes per program, tokens unrolled per loop iteration, lanes wanted per
# launch (lines are cut into segments until there are about as many), and for M = 1,
# M = 2 whether a loop iteration's loads are issued one iteration ahead (more
# registers, loads in flight during arithmetic; off for both since session 25: the
# network's fuses 1% faster, its training step the same). Chosen by `bench_scan.py
# --sweep forward` and in the network on an H200 (BENCHMARKS.md).
FWD_CB, FWD_LANES, FWD_UNROLL, FWD_PREFETCH = (1, 1), 128, 1, (False, False)
TARGET_LANES = 1 << 17
# Lines of at most this many steps stay one chunk (cutting them costs more than the
# parallel work gains; `_segments`, BENCHMARKS.md session 18).
WHOLE_LINE_STEPS = 64
# Backward: channels per lane of the sweep (a forward-kernel mode that also keeps
# an adjoint per state; its loads are not issued ahead, which measured no faster);
# channels per lane of the backward kernel (its channel sums of dL/dB and dL/dC start
# in registers); lanes per program (one warp: the kernel's exchanges are warp
# shuffles); scan steps per block for M = 1 (halved for M = 2); most lane groups
# summed in registers before an atomic add; lanes per group (a power of two: the
# lanes that share a line and channels and split their states).
# Chosen on an H200 (BENCHMARKS.md session 19; `bench_scan.py --sweep backward`).
SWEEP_CB, BWD_CB, BWD_LANES, BWD_STEPS, BWD_GROUP, BWD_PARTS = 1, 2, 32, 4, 8, 4
# Whether the backward's walk issues its loads one iteration ahead where it computes the
# local adjoints only (MODE_ADJOINT: fewer registers than the sweep), for M = 1 and M = 2
# (BENCHMARKS.md session 24).
ADJOINT_PF = (False, True)
# Slots of the backward's partial sums of dL/dA, dL/dD and dL/d(delta_bias): chunk i adds
# to slot i % PART_SLOTS atomically (few enough for a short reduction, enough that
# neighbouring programs rarely add to one address).
PART_SLOTS = tl.constexpr(32)
# Whether the forward modes read B and C by vector loads where their layout allows
# (``_state_loads``; off: one load per state, as for other layouts).
VECTOR_STATES = True
# Chunk combine: chunk slots per scan block, states per program, warps (chosen on the
# fusing cases, `bench_scan.py --sweep combine`); the same for directions of at most
# SHORT_SLOTS chunk slots, such as the training batch's (19-76 whole lines): fewer
# padded slots per block and wider programs (`--sweep train-combine`; BENCHMARKS.md
# session 22).
COMBINE_ROWS, COMBINE_STATES, COMBINE_WARPS = 16, 16, 4
SHORT_SLOTS, SHORT_ROWS, SHORT_STATES, SHORT_WARPS = 128, 8, 32, 4

_SIZES = ["H", "W", "N", "NL", "NS", "SEG", "NBLK"]
_STRIDES = [
    "su_b", "su_m", "su_c", "sd_b", "sd_m", "sd_k", "sd_c", "sb_b", "sb_m", "sb_k", "sb_n",
    "sc_b", "sc_m", "sc_k", "sc_n", "sy_b", "sy_m", "sy_c", "sg_b", "sg_m", "sg_c",
    "sgd_b", "sgd_m", "sgd_k", "sgd_c", "sgu_b", "sgu_m", "sgu_c", "sgb_b", "sgb_m", "sgb_k", "sgb_n",
]  # fmt: skip
# Strides that are 1 in the network's layouts (channels, and states, innermost): triton
# compiles a kernel for each of them being 1 or not, so that where they are 1 a lane's
# neighbouring channels and states are read at constant offsets from one address (fewer
# address computations and registers; BENCHMARKS.md session 21).
_UNIT_STRIDES = ["su_c", "sd_c", "sg_c", "sy_c", "sgu_c", "sgd_c", "sb_n", "sc_n", "sgb_n"]


# ---------------------------------------------------------------------- helpers


def _scan_jit(fn):
    """triton.jit without specialisation on sizes, size-dependent strides and pointer
    alignment (every access is a gather, so they would only multiply compilations),
    except that a kernel is compiled for each of ``_UNIT_STRIDES`` being 1 or not."""
    params = inspect.signature(fn).parameters
    names = [a for a, p in params.items() if p.annotation != "tl.constexpr"]  # (annotations are strings here)
    fixed = [a for a in names if a in _SIZES or a in _STRIDES or a == "d" or a.endswith("_ptr")]
    unit = [a for a in fixed if a in _UNIT_STRIDES]
    if "do_not_specialize_on_alignment" not in inspect.signature(triton.jit).parameters:  # (older triton)
        return triton.jit(do_not_specialize=fixed)(fn)
    return triton.jit(do_not_specialize=[a for a in fixed if a not in unit], do_not_specialize_on_alignment=unit)(fn)


@triton.jit
def _exp2(x):
    if FAST_MATH:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _rcp(x):
    """1 / x in one instruction (relative error below 2**-23)."""
    if FAST_MATH:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


# How the backward kernel adds its channel sums of dL/dB and dL/dC (``RED``): one atomic add
# per value, the lane groups summed before them as many as the groups per line allow (up
# to BWD_GROUP); or the sums of dL/dB and dL/dC of one token and state together (so the
# groups summed must also divide a block's tokens: 4 for the network's scans), by two
# atomic adds (for Triton's interpreter) or by one vector reduction (compute capability 9.0
# and later: ``_reductions``). The adds cost by their number (BENCHMARKS.md session 20).
RED_VALUES = tl.constexpr(0)
RED_PAIRS = tl.constexpr(1)
RED_VECTOR = tl.constexpr(2)


@triton.jit
def _add_pair(p, x, y, mask, VEC: tl.constexpr):
    """Atomically adds x to p[0] and y to p[1] (float32) where mask holds; VEC: by one
    vector reduction (PTX red.global.add.v2.f32: compute capability 9.0 and later, p
    8-byte aligned; tl.atomic_add issues one reduction per value, also for neighbours)."""
    if VEC:
        tl.inline_asm_elementwise(
            "{ .reg .pred q; setp.ne.b32 q, $4, 0; @q red.global.add.v2.f32 [$1], {$2, $3}; mov.b32 $0, 0; }",
            "=r,l,f,f,r", [p.to(tl.int64), x, y, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    else:
        tl.atomic_add(p, x, mask=mask, sem="relaxed")
        tl.atomic_add(p + 1, y, mask=mask, sem="relaxed")


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20) in float32 to a few ulp, from
    one exp2 and one reciprocal: max(x, 0) + log1p(t) with t = exp(-|x|) in (0, 1], and
    log1p(t) = 2 atanh(s), s = t / (2 + t) in (0, 1/3], by its odd series to s**13
    (truncation below 2e-8 relative)."""
    t = _exp2(tl.abs(x) * -LOG2E_F)
    s = t * _rcp(2.0 + t)
    s2 = s * s
    q = s2 * (1.0 / 13.0) + (1.0 / 11.0)
    q = q * s2 + (1.0 / 9.0)
    q = q * s2 + (1.0 / 7.0)
    q = q * s2 + (1.0 / 5.0)
    q = q * s2 + (1.0 / 3.0)
    q = q * s2 + 1.0
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + 2.0 * s * q)


@triton.jit
def _sigmoid(x):
    return _rcp(1.0 + _exp2(x * -LOG2E_F))


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
def _lanes(d, H, W, NS, K: tl.constexpr, E: tl.constexpr, CB: tl.constexpr, G: tl.constexpr):
    """The work of this program: batch element bi, direction k, segment sg, lanes per
    line and state part (nq), the E lanes' lines j, first channels c0 and state parts q
    (G neighbouring lanes share a line and channels and split their states), direction
    k's geometry (see :func:`_geometry`), and whether every lane lies past its last line
    (the grid covers the lines of the longest side for every direction)."""
    pid0 = tl.program_id(0)
    pid_bk = tl.program_id(1)
    bi = (pid_bk // K).to(tl.int64)
    k = pid_bk % K
    sg = pid0 % NS
    nq = (d + CB - 1) // CB
    f = (pid0 // NS) * E + tl.arange(0, E)
    q = f % G
    j = f // G // nq
    c0 = (f // G % nq) * CB
    nlines, llen, base, line_step, pos_step = _geometry(k, H, W)
    idle = (pid0 // NS) * E >= nlines * nq * G
    return bi, k, sg, nq, j, c0, q, nlines, llen, base, line_step, pos_step, idle


@triton.jit
def _combine(a1, b1, a2, b2):
    """Composition of two affine maps h -> a h + b (first, then second)."""
    return a1 * a2, a2 * b1 + b2


# ---------------------------------------------------------------------- forward

# what a _fwd_kernel launch computes
MODE_END = tl.constexpr(0)  # forward pass 1: chunk end states from a zero state, chunk sums of dt
MODE_Y = tl.constexpr(1)  # forward pass 3: y from the chunks' true start states
# the backward's modes (read dL/dy; MODE >= MODE_SWEEP):
MODE_SWEEP = tl.constexpr(2)  # the state entering every block, the chunks' local adjoints
MODE_ADJOINT = tl.constexpr(3)  # the chunks' local adjoints only (the forward's MODE_Y stored the block states)


@triton.jit
def _shifted(P, off, CB: tl.constexpr):
    """The CB pointers of P moved by off elements."""
    Q = tl.tuple([])
    for e in tl.static_range(CB):
        Q = Q + (P[e] + off,)
    return Q


# how the forward modes read a token's N states of B and C (state stride 1)
VEC_NONE = tl.constexpr(0)  # one load per state
VEC_VALUES = tl.constexpr(1)  # vector loads of float32 values
VEC_WORDS = tl.constexpr(2)  # vector loads of 32-bit words, each two bfloat16 states


@triton.jit
def _columns(X, W: tl.constexpr):
    """The W columns of X (E, W), W a power of two, as a tuple of (E,) tensors (in
    registers: a lane holds its row)."""
    if W == 1:
        return (tl.reshape(X, [X.shape[0]]),)
    else:
        even, odd = tl.split(tl.reshape(X, [X.shape[0], W // 2, 2]))
        EV = _columns(even, W // 2)
        OD = _columns(odd, W // 2)
        R = tl.tuple([])
        for i in tl.static_range(W // 2):
            R = R + (EV[i], OD[i])
        return R


@triton.jit
def _vector_states(p, mask, N: tl.constexpr, VEC: tl.constexpr):
    """A token's N states of B or C from p (per lane; 16-byte aligned, state stride 1),
    as 32-bit words: N float32 values (VEC_VALUES) or N / 2 pairs of bfloat16 states
    (VEC_WORDS); :func:`_state` takes a state from them."""
    q = tl.multiple_of(p.to(tl.pointer_type(tl.int32)), 16)
    if VEC == VEC_WORDS:
        return _vector_loads(q, mask, N // 2)
    else:
        return _vector_loads(q, mask, N)


@triton.jit
def _vector_loads(q, mask, COUNT: tl.constexpr):
    """The COUNT 32-bit elements from q (per lane, 16-byte aligned) as a tuple of (E,)
    tensors, read by 16-byte loads and an 8- and a 4-byte one for the rest (every load
    aligned to its width; wider chunks would be spread over several lanes)."""
    X = tl.tuple([])
    for i in tl.static_range(COUNT // 4):
        X = X + _columns(tl.load(q[:, None] + (4 * i + tl.arange(0, 4))[None, :], mask=mask), 4)
    if COUNT % 4 >= 2:
        X = X + _columns(tl.load(q[:, None] + (COUNT // 4 * 4 + tl.arange(0, 2))[None, :], mask=mask), 2)
    if COUNT % 2 == 1:
        X = X + (tl.load(q + (COUNT - 1), mask=mask),)
    return X


@triton.jit
def _state(X, n: tl.constexpr, VEC: tl.constexpr):
    """State n of the states X that :func:`_fwd_loads` read, in float32 (the bfloat16
    halves of a word: its upper 16 bits, low ones zero, are the float32 value)."""
    if VEC == VEC_WORDS:
        if n % 2 == 0:
            return (X[n // 2] << 16).to(tl.float32, bitcast=True)
        else:
            return (X[n // 2] & -65536).to(tl.float32, bitcast=True)
    elif VEC == VEC_VALUES:
        return X[n].to(tl.float32, bitcast=True)
    else:
        return X[n].to(tl.float32)


@triton.jit
def _fwd_loads(
    i0, hi, lmask, UP, DP, YP, CM, WR, pb, pc, st_u, st_d, st_y, st_b, st_c,
    su_m, sd_m, sd_c, sb_m, sb_n, sc_m, sc_n, sy_m,
    M: tl.constexpr, N: tl.constexpr, CB: tl.constexpr, TB: tl.constexpr, MODE: tl.constexpr, UNIT_N: tl.constexpr,
    VEC: tl.constexpr, AHEAD: tl.constexpr, LOWR: tl.constexpr,
):  # fmt: skip
    """The raw inputs of the TB steps from i0: per step and modality (delta, u, dL/dy per
    channel, zeros past hi; B, C per state, see :func:`_state`), what MODE reads. UP, DP,
    YP (per channel), pb, pc point at step i0 (step ``st_*`` elements apart). A step past
    hi reads step i0, B and C unmasked (that step's dt is 0, so they are unused); with
    UNIT_N (state stride 1 in both) at constant offsets from one address, with VEC by
    vector loads (:func:`_vector_states`). AHEAD (the loads of the next iteration): i0
    may lie past hi, where B and C are not read (the values are never used).
    With LOWR: DP[0] points at the step's low-rank delta (LOWR values ``sd_c`` apart,
    read as B and C are), and each channel's delta is its up-projection by the
    channel's row of WR (``e * LOWR + r``, the weights as given), summed and kept in
    float32: not rounded to the low-rank delta's dtype as a matrix product in that dtype
    would round it (rounding costs two conversions per step; the unrounded delta is the
    more accurate)."""
    if AHEAD:
        bc = i0 < hi
    else:
        bc = None
    X = tl.tuple([])
    for s in tl.static_range(TB):
        v = lmask & (i0 + s < hi)
        o = tl.where(i0 + s < hi, s, 0).to(tl.int64)
        for m in tl.static_range(M):
            DL = tl.tuple([])
            UU = tl.tuple([])
            GY = tl.tuple([])
            LW = tl.tuple([])
            for r in tl.static_range(LOWR):
                LW = LW + (tl.load(DP[0] + (m * sd_m + o * st_d + r * sd_c), mask=bc).to(tl.float32),)
            for e in tl.static_range(CB):
                ve = v & CM[e]
                if LOWR == 0:
                    DL = DL + (tl.load(DP[e] + (m * sd_m + o * st_d), mask=ve, other=0.0),)
                else:
                    acc = LW[0] * WR[e * LOWR]
                    for r in tl.static_range(1, LOWR):
                        acc += LW[r] * WR[e * LOWR + r]
                    DL = DL + (acc,)
                if MODE != MODE_ADJOINT:
                    UU = UU + (tl.load(UP[e] + (m * su_m + o * st_u), mask=ve, other=0.0),)
                if MODE >= MODE_SWEEP:
                    GY = GY + (tl.load(YP[e] + (m * sy_m + o * st_y), mask=ve, other=0.0),)
            pbs = pb + (m * sb_m + o * st_b)
            pcs = pc + (m * sc_m + o * st_c)
            BN = tl.tuple([])
            CN = tl.tuple([])
            if VEC != VEC_NONE:
                if MODE != MODE_ADJOINT:
                    BN = _vector_states(pbs, bc, N, VEC)
                if MODE != MODE_END:
                    CN = _vector_states(pcs, bc, N, VEC)
            else:
                for n in tl.static_range(N):
                    if UNIT_N:
                        if MODE != MODE_ADJOINT:
                            BN = BN + (tl.load(pbs + n, mask=bc),)
                        if MODE != MODE_END:
                            CN = CN + (tl.load(pcs + n, mask=bc),)
                    else:
                        if MODE != MODE_ADJOINT:
                            BN = BN + (tl.load(pbs + n * sb_n, mask=bc),)
                        if MODE != MODE_END:
                            CN = CN + (tl.load(pcs + n * sc_n, mask=bc),)
            X = X + (tl.tuple([DL, UU, GY, BN, CN]),)
    return X


@_scan_jit
def _fwd_kernel(
    u_ptr,
    dl_ptr,  # (b, M, K, d, L): delta; with LOWR (forward modes only), (b, M, K, LOWR, L): the low-rank delta
    a_ptr, b_ptr, c_ptr, dsk_ptr, bias_ptr,
    w_ptr,  # with LOWR, (K, d, LOWR): the up-projection of the low-rank delta
    st_ptr,  # (b*K, NL, NS, d, N) f32: MODE_END writes chunk-local end states; the others read start states
    dts_ptr,  # (b*K, NL, NS, d) f32: MODE_END writes the chunk sums of dt
    y_ptr,  # (b, M, d, L) f32, any strides: MODE_Y adds y (zeroed before); the backward's modes read dL/dy
    ck_ptr,  # (b*K, NL, NBLK, N, d) f32 or bf16: with CK, the state entering every block of CKB steps
    e_ptr,  # (b*K, NL, NS, d, N) f32: the backward's modes write the adjoint a chunk passes to the state before it
    H, W, NL, NS, SEG, NBLK, d,
    su_b, su_m, su_c, su_l,
    sd_b, sd_m, sd_k, sd_c, sd_l,
    sb_b, sb_m, sb_k, sb_n, sb_l,
    sc_b, sc_m, sc_k, sc_n, sc_l,
    sy_b, sy_m, sy_c, sy_l,
    K: tl.constexpr, M: tl.constexpr, N: tl.constexpr, CB: tl.constexpr, E: tl.constexpr, TB: tl.constexpr,
    MODE: tl.constexpr, CK: tl.constexpr, CKB: tl.constexpr, PF: tl.constexpr, UNIT_N: tl.constexpr,
    VEC: tl.constexpr, LOWR: tl.constexpr,
):  # fmt: skip
    """One chunk (a segment of SEG steps of a line) of E (line, channel group) lanes;
    lane = one line x CB neighbouring channels, the N states of each in registers
    (MODE_ADJOINT: only the decays' products and the local adjoint); TB steps unrolled
    per iteration. CK (MODE_Y, MODE_SWEEP): store the state entering every block of CKB
    steps (TB divides CKB, and CKB divides SEG). LOWR > 0: delta is computed from the
    low-rank delta (:func:`_fwd_loads`)."""
    tl.static_assert(LOWR == 0 or MODE < MODE_SWEEP)
    bi, k, sg, nq, j, c0, _, nlines, llen, base, line_step, pos_step, idle = _lanes(d, H, W, NS, K, E, CB, 1)
    if idle:
        return
    pid_bk = tl.program_id(1)
    lmask = j < nlines
    lo = sg * SEG
    hi = tl.minimum(lo + SEG, llen)
    # the lanes' position at step lo (the line's last step for an empty segment); lanes
    # past the last line read the last line (their results are masked): every position
    # a program reads is inside the image. The pointers below move along the line by
    # st_* elements per step.
    pos = (base + tl.minimum(j, nlines - 1) * line_step).to(tl.int64) + tl.minimum(lo, hi - 1) * pos_step
    st_u = pos_step.to(tl.int64) * su_l
    st_d = pos_step.to(tl.int64) * sd_l
    st_y = pos_step.to(tl.int64) * sy_l
    st_b = pos_step.to(tl.int64) * sb_l
    st_c = pos_step.to(tl.int64) * sc_l
    row = (pid_bk.to(tl.int64) * NL + j) * NS + sg
    ck_line = (pid_bk.to(tl.int64) * NL + j) * NBLK * N * d
    # per channel e of the lane: mask, pointers, bias, skip, A * log2(e) per state
    # (index n * CB + e)
    CM = tl.tuple([])
    UP = tl.tuple([])
    DP = tl.tuple([])
    YP = tl.tuple([])
    BIAS = tl.tuple([])
    DSK = tl.tuple([])
    WR = tl.tuple([])  # LOWR: the lane's channels' rows of the up-projection
    for e in tl.static_range(CB):
        c = c0 + e
        cm = lmask & (c < d)
        CM = CM + (cm,)
        UP = UP + (u_ptr + bi * su_b + c * su_c + pos * su_l,)
        if LOWR == 0:
            DP = DP + (dl_ptr + bi * sd_b + k * sd_k + c * sd_c + pos * sd_l,)
        else:
            DP = DP + (dl_ptr + bi * sd_b + k * sd_k + pos * sd_l,)
            for r in tl.static_range(LOWR):
                WR = WR + (tl.load(w_ptr + (k * d + c) * LOWR + r, mask=cm, other=0.0).to(tl.float32),)
        YP = YP + (y_ptr + bi * sy_b + c * sy_c + pos * sy_l,)
        BIAS = BIAS + (tl.load(bias_ptr + k * d + c, mask=cm, other=0.0),)
        DSK = DSK + (tl.load(dsk_ptr + k * d + c, mask=cm, other=0.0),)
    A2 = tl.tuple([])
    Hs = tl.tuple([])
    PR = tl.tuple([])  # the backward's modes: product of the decays since the chunk start, per state
    EA = tl.tuple([])  # and the local adjoint
    for n in tl.static_range(N):
        for e in tl.static_range(CB):
            c = c0 + e
            A2 = A2 + (tl.load(a_ptr + (k * d + c) * N + n, mask=CM[e], other=0.0).to(tl.float32) * LOG2E_F,)
            if MODE == MODE_END:
                Hs = Hs + (tl.zeros([E], tl.float32),)
            elif MODE != MODE_ADJOINT:
                Hs = Hs + (tl.load(st_ptr + (row * d + c) * N + n, mask=CM[e], other=0.0),)
            if MODE >= MODE_SWEEP:
                PR = PR + (tl.full([E], 1.0, tl.float32),)
                EA = EA + (tl.zeros([E], tl.float32),)
    DTS = tl.tuple([])
    for e in tl.static_range(CB):
        DTS = DTS + (tl.zeros([E], tl.float32),)
    pb = b_ptr + bi * sb_b + k * sb_k + pos * sb_l
    pc = c_ptr + bi * sc_b + k * sc_k + pos * sc_l
    if PF:
        X = _fwd_loads(lo, hi, lmask, UP, DP, YP, CM, WR, pb, pc, st_u, st_d, st_y, st_b, st_c,
                       su_m, sd_m, sd_c, sb_m, sb_n, sc_m, sc_n, sy_m, M, N, CB, TB, MODE, UNIT_N, VEC, True, LOWR)
    for i0 in range(lo, hi, TB):
        # the next iteration's pointers
        UPn = _shifted(UP, TB * st_u, CB)
        DPn = _shifted(DP, TB * st_d, CB)
        YPn = _shifted(YP, TB * st_y, CB)
        pbn = pb + TB * st_b
        pcn = pc + TB * st_c
        if PF:  # the next iteration's loads go out before this one's arithmetic
            X_nx = _fwd_loads(i0 + TB, hi, lmask, UPn, DPn, YPn, CM, WR, pbn, pcn, st_u, st_d, st_y, st_b, st_c,
                              su_m, sd_m, sd_c, sb_m, sb_n, sc_m, sc_n, sy_m, M, N, CB, TB, MODE, UNIT_N, VEC, True,
                              LOWR)
        else:
            X = _fwd_loads(i0, hi, lmask, UP, DP, YP, CM, WR, pb, pc, st_u, st_d, st_y, st_b, st_c,
                           su_m, sd_m, sd_c, sb_m, sb_n, sc_m, sc_n, sy_m, M, N, CB, TB, MODE, UNIT_N, VEC, False, LOWR)
        if CK:
            if i0 % CKB == 0:  # a block starts: store its entering state
                blk = i0 // CKB
                for n in tl.static_range(N):
                    for e in tl.static_range(CB):
                        # (streamed: written once here, read once by _bwd_kernel; see there)
                        tl.store(ck_ptr + ck_line + (blk * N + n) * d + c0 + e,
                                 Hs[n * CB + e].to(ck_ptr.dtype.element_ty), mask=CM[e], eviction_policy="evict_first")
        for s in tl.static_range(TB):
            v = lmask & (i0 + s < hi)
            for m in tl.static_range(M):
                DL, UU, GY, BN, CN = X[s * M + m]
                DT = tl.tuple([])
                DTU = tl.tuple([])
                Y = tl.tuple([])  # MODE_Y: y; the backward's modes: dL/dy
                for e in tl.static_range(CB):
                    dt = tl.where(v & CM[e], _softplus(DL[e].to(tl.float32) + BIAS[e]), 0.0)
                    DT = DT + (dt,)
                    if MODE != MODE_ADJOINT:
                        uu = UU[e].to(tl.float32)
                        DTU = DTU + (dt * uu,)
                    if MODE == MODE_Y:
                        Y = Y + (DSK[e] * uu,)
                    if MODE >= MODE_SWEEP:
                        Y = Y + (GY[e].to(tl.float32),)
                if MODE == MODE_END:
                    DTS2 = tl.tuple([])
                    for e in tl.static_range(CB):
                        DTS2 = DTS2 + (DTS[e] + DT[e],)
                    DTS = DTS2
                H2 = tl.tuple([])
                PR2 = tl.tuple([])
                EA2 = tl.tuple([])
                for n in tl.static_range(N):
                    if MODE != MODE_ADJOINT:
                        bn = _state(BN, n, VEC)
                    if MODE != MODE_END:
                        cn = _state(CN, n, VEC)
                    Y2 = tl.tuple([])
                    for e in tl.static_range(CB):
                        a = _exp2(DT[e] * A2[n * CB + e])
                        if MODE != MODE_ADJOINT:
                            h = a * Hs[n * CB + e] + DTU[e] * bn
                            H2 = H2 + (h,)
                        if MODE == MODE_Y:
                            Y2 = Y2 + (Y[e] + cn * h,)
                        if MODE >= MODE_SWEEP:
                            pr = PR[n * CB + e] * a
                            PR2 = PR2 + (pr,)
                            EA2 = EA2 + (EA[n * CB + e] + pr * (Y[e] * cn),)
                    if MODE == MODE_Y:
                        Y = Y2
                Hs = H2
                if MODE >= MODE_SWEEP:
                    PR = PR2
                    EA = EA2
                if MODE == MODE_Y:
                    for e in tl.static_range(CB):
                        tl.atomic_add(YP[e] + (m * sy_m + s * st_y), Y[e], mask=v & CM[e], sem="relaxed")
        UP, DP, YP, pb, pc = UPn, DPn, YPn, pbn, pcn
        if PF:
            X = X_nx
    # a segment slot past the line's end stays an identity for the combines: dt sum 0,
    # state 0, local adjoint 0
    if MODE == MODE_END:
        for e in tl.static_range(CB):
            c = c0 + e
            tl.store(dts_ptr + row * d + c, DTS[e], mask=CM[e])
            for n in tl.static_range(N):
                tl.store(st_ptr + (row * d + c) * N + n, Hs[n * CB + e], mask=CM[e])
    if MODE >= MODE_SWEEP:
        for e in tl.static_range(CB):
            for n in tl.static_range(N):
                tl.store(e_ptr + (row * d + c0 + e) * N + n, EA[n * CB + e], mask=CM[e])


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
    a_ptr,  # (K*d, N): A
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
    a2 = tl.load(a_ptr + k * d * N + s, mask=smask, other=0.0).to(tl.float32) * LOG2E_F
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


@triton.jit
def _sum_scatter(X, lane, NX: tl.constexpr, CT: tl.constexpr, STRIDE: tl.constexpr):
    """Sums over groups of CT lanes STRIDE apart (CT and STRIDE powers of two, CT * STRIDE
    at most 32: lanes of one warp) of the NX values X (a tuple of lane vectors; NX a power
    of two or a multiple of CT), spread over the group: every lane ends with
    max(1, NX / CT) of the sums, those of X's values that :func:`_scatter_slots` gives.

    A halving exchange: at each level a lane keeps half of its values, sends the other
    half to the lane that keeps those, and adds what it receives (one warp shuffle per
    value sent). For NX >= CT that is NX - NX / CT shuffles, against NX log2(CT) for a
    butterfly per value. Once a lane holds one value (NX < CT), each remaining level is
    one butterfly shuffle."""
    tl.static_assert((NX & (NX - 1)) == 0 or NX % CT == 0, "the values must be a power of two or fill the group")
    tl.static_assert(CT * STRIDE <= 32, "a group is at most a warp")
    for level in tl.static_range(5):
        if (CT >> (level + 1)) > 0:
            X = _scatter_level(X, lane, (CT >> (level + 1)) * STRIDE, NX >> (level + 1))
    return X


@triton.jit
def _scatter_level(X, lane, m: tl.constexpr, HALF: tl.constexpr):
    """One level of :func:`_sum_scatter`: the partner is lane ^ m; a lane keeps HALF of
    its values (or its one value, HALF = 0)."""
    up = (lane & m) != 0
    Y = tl.tuple([])
    if HALF > 0:
        for i in tl.static_range(HALF):
            keep = tl.where(up, X[i + HALF], X[i])
            send = tl.where(up, X[i], X[i + HALF])
            Y = Y + (keep + tl.gather(send, lane ^ m, 0),)
    else:
        Y = Y + (X[0] + tl.gather(X[0], lane ^ m, 0),)
    return Y


@triton.jit
def _scatter_slots(lane, NX: tl.constexpr, CT: tl.constexpr, STRIDE: tl.constexpr):
    """For :func:`_sum_scatter`: the index in X of a lane's first sum (its i-th sum is
    X's value first + i), and whether the lane is the one of its group that holds them
    (where NX < CT, the butterfly levels leave a sum on several lanes)."""
    first = tl.zeros_like(lane)
    own = lane == lane
    for level in tl.static_range(5):
        if (CT >> (level + 1)) > 0:
            up = (lane & ((CT >> (level + 1)) * STRIDE)) != 0
            if (NX >> (level + 1)) > 0:
                first += tl.where(up, NX >> (level + 1), 0)
            else:
                own = own & ~up
    return first, own


@_scan_jit
def _bwd_kernel(
    u_ptr, dl_ptr,
    a_ptr,  # (K*d, N): A
    b_ptr, c_ptr, dsk_ptr, bias_ptr, g_ptr,
    ck_ptr,  # (b*K, NL, NBLK, N, d) f32 or bf16 (_checkpoint_dtype): state entering every block (_fwd_kernel's CK)
    q_ptr,  # (b*K, NL, NS, d, N) f32: adjoint arriving at each chunk end
    part_ptr,  # (PART_SLOTS, K, N + 2, d) f32, zeroed: every chunk adds its lanes' partial dL/dA (rows
    # n < N), dL/dD (row N) and dL/d(delta_bias) (row N + 1) to slot (chunk index) % PART_SLOTS atomically;
    # the slots are summed by one reduction
    gdl_ptr,  # (b, M, K, d, L) out, delta's dtype, any strides
    gu_ptr,  # (b, M, d, L) f32, zeroed, any strides (atomic over the directions)
    gbc_ptr,  # (b, M, K, N, L, 2) f32, zeroed, any strides but 1 for the last dimension: dL/dB, dL/dC
    # (atomic over channel groups; sgb_* are the strides of the first five dimensions, counted in pairs)
    H, W, NL, NS, SEG, NBLK, d,
    su_b, su_m, su_c, su_l,
    sd_b, sd_m, sd_k, sd_c, sd_l,
    sb_b, sb_m, sb_k, sb_n, sb_l,
    sc_b, sc_m, sc_k, sc_n, sc_l,
    sg_b, sg_m, sg_c, sg_l,
    sgd_b, sgd_m, sgd_k, sgd_c, sgd_l,
    sgu_b, sgu_m, sgu_c, sgu_l,
    sgb_b, sgb_m, sgb_k, sgb_n, sgb_l,
    K: tl.constexpr, M: tl.constexpr, N: tl.constexpr, E: tl.constexpr, TB: tl.constexpr, CT: tl.constexpr,
    CB: tl.constexpr, G: tl.constexpr, RED: tl.constexpr,
):  # fmt: skip
    """One chunk of E lanes, walked backwards block by block. A lane is one line, CB
    neighbouring channels and NQ = ceil(N / G) of their states, n = i * G + q for the
    lane's place q among the G neighbouring lanes that share its line and channels (a
    group; its lanes' loads of B and C read neighbouring states). The adjoint and the
    dL/dA partial of the lane's states stay in registers for the whole chunk; per block
    the lane recomputes its states from the stored ones and runs the adjoint back
    through them.

    A block's (token, channel) slots are split over the group: each lane reads delta, u
    and dL/dy of its slots and computes dt, and the group shares them by warp shuffles;
    after the walk the lane finishes the same slots (dL/du, dL/d(delta)) from their sums
    over the states, gathered over the group by a halving exchange. The channel sums of
    dL/dB and dL/dC go over the lane's CB channels, then by the same exchange over CT
    groups (CT divides the groups per line), then atomically, as RED says: each lane
    NX / CT of the sums (RED_VALUES), or those of TL = NT / CT whole tokens (CT divides the
    block's tokens), B's and C's of one token and state together (neighbours in gbc)."""
    NT: tl.constexpr = TB * M
    NQ: tl.constexpr = (N + G - 1) // G
    NX: tl.constexpr = 2 * NT * NQ  # per token and state of the lane: the channel sums for dL/dB and dL/dC
    R: tl.constexpr = max(1, NX // CT)  # of which each lane adds R to memory (RED_VALUES)
    TL: tl.constexpr = max(1, NT // CT)  # or those of TL whole tokens (RED_PAIRS, RED_VECTOR)
    tl.static_assert(RED == RED_VALUES or NT % CT == 0, "CT must divide the tokens of a block")
    NS1: tl.constexpr = NT * CB  # (token, channel) slots of a block (index t * CB + e)
    R1: tl.constexpr = max(1, NS1 // G)  # of which each lane computes and finishes R1
    SPREAD: tl.constexpr = max(1, G // NS1)  # (slot s is the lane's r-th when s = q // SPREAD * R1 + r)
    bi, k, sg, nq, j, c0, q, nlines, llen, base, line_step, pos_step, idle = _lanes(d, H, W, NS, K, E, CB, G)
    if idle:
        return
    pid_bk = tl.program_id(1)
    lane = tl.arange(0, E)
    first, own = _scatter_slots(lane, NX, CT, G)
    first1, own1 = _scatter_slots(lane, NS1, G, 1)
    lmask = j < nlines
    line_off = (base + j * line_step).to(tl.int64)
    lo = sg * SEG
    hi = tl.maximum(tl.minimum(lo + SEG, llen), lo)
    row = (pid_bk.to(tl.int64) * NL + j) * NS + sg
    prow = ((bi * NL + j) * NS + sg) % PART_SLOTS * K + k
    ck_line = (pid_bk.to(tl.int64) * NL + j) * NBLK * N * d
    ps = pos_step.to(tl.int64)
    # per (channel, state) (index e * NQ + i): mask, offset in the stored states, A * log2(e),
    # the adjoint (from the chunk's arriving one), dL/dA partial
    CS = tl.tuple([])
    CKO = tl.tuple([])
    A2 = tl.tuple([])
    GN = tl.tuple([])
    GAc = tl.tuple([])
    for e in tl.static_range(CB):
        c = c0 + e
        for i in tl.static_range(NQ):
            n = i * G + q
            cs = lmask & (c < d) & (n < N)
            CS = CS + (cs,)
            CKO = CKO + (ck_line + n * d + c,)
            A2 = A2 + (tl.load(a_ptr + (k * d + c) * N + n, mask=cs, other=0.0).to(tl.float32) * LOG2E_F,)
            GN = GN + (tl.load(q_ptr + (row * d + c) * N + n, mask=cs, other=0.0),)
            GAc = GAc + (tl.zeros([E], tl.float32),)
    # per state i: B and C of the lane's line at step 0 (a block adds its scalar offsets)
    BP = tl.tuple([])
    CP = tl.tuple([])
    SM = tl.tuple([])
    for i in tl.static_range(NQ):
        n = i * G + q
        SM = SM + (lmask & (n < N),)
        BP = BP + (b_ptr + bi * sb_b + k * sb_k + line_off * sb_l + n * sb_n,)
        CP = CP + (c_ptr + bi * sc_b + k * sc_k + line_off * sc_l + n * sc_n,)
    # per slot r of this lane: its channel, its step in a block, its mask, bias, skip, and
    # pointers at block step 0; partial dL/dD and dL/d(delta_bias) (summed over the group
    # at the end)
    CH = tl.tuple([])
    STEP = tl.tuple([])
    OK1 = tl.tuple([])
    BIAS = tl.tuple([])
    DSK = tl.tuple([])
    PDL = tl.tuple([])
    PU = tl.tuple([])
    PGY = tl.tuple([])
    PGU = tl.tuple([])
    PGDL = tl.tuple([])
    GD = tl.tuple([])
    GBIAS = tl.tuple([])
    for r in tl.static_range(R1):
        slot = first1 + r
        ch = slot % CB
        c = c0 + ch
        mt = slot // CB % M
        step = slot // CB // M
        cm = lmask & (c < d)
        CH = CH + (ch,)
        STEP = STEP + (step,)
        OK1 = OK1 + (cm,)
        BIAS = BIAS + (tl.load(bias_ptr + k * d + c, mask=cm, other=0.0),)
        DSK = DSK + (tl.load(dsk_ptr + k * d + c, mask=cm, other=0.0),)
        p = line_off + step * ps
        PDL = PDL + (dl_ptr + bi * sd_b + mt * sd_m + k * sd_k + c * sd_c + p * sd_l,)
        PU = PU + (u_ptr + bi * su_b + mt * su_m + c * su_c + p * su_l,)
        PGY = PGY + (g_ptr + bi * sg_b + mt * sg_m + c * sg_c + p * sg_l,)
        PGU = PGU + (gu_ptr + bi * sgu_b + mt * sgu_m + c * sgu_c + p * sgu_l,)
        PGDL = PGDL + (gdl_ptr + bi * sgd_b + mt * sgd_m + k * sgd_k + c * sgd_c + p * sgd_l,)
        GD = GD + (tl.zeros([E], tl.float32),)
        GBIAS = GBIAS + (tl.zeros([E], tl.float32),)
    # the channel sums this lane adds: RED_VALUES, per sum r: pointer at block step 0, step in
    # a block, mask; otherwise per token t of its TL: step in a block, and per (token, state)
    # (index t * NQ + i): pointer at block step 0 to dL/dB (dL/dC follows; masked by SM[i])
    PBC = tl.tuple([])
    STEP2 = tl.tuple([])
    OK2 = tl.tuple([])
    line_pairs = bi * sgb_b + k * sgb_k + line_off * sgb_l  # (in pairs)
    if RED == RED_VALUES:
        for r in tl.static_range(R):
            slot = first + r
            tok = slot // (2 * NQ)
            n = (slot // 2) % NQ * G + q
            pair = line_pairs + (tok % M) * sgb_m + (tok // M) * ps * sgb_l + n * sgb_n
            PBC = PBC + (gbc_ptr + (2 * pair + slot % 2),)
            STEP2 = STEP2 + (tok // M,)
            OK2 = OK2 + (own & lmask & (n < N),)
    else:
        for t in tl.static_range(TL):
            tok = first // (2 * NQ) + t
            STEP2 = STEP2 + (tok // M,)
            for i in tl.static_range(NQ):
                n = i * G + q
                PBC = PBC + (gbc_ptr + 2 * (line_pairs + (tok % M) * sgb_m + (tok // M) * ps * sgb_l + n * sgb_n),)
    src = lane - q  # the group's first lane
    st_b = ps * sb_l  # B's and C's offsets from one step to the next
    st_c = ps * sc_l
    nb = (hi - lo + TB - 1) // TB
    for ib in range(0, nb):
        i0 = lo + (nb - 1 - ib) * TB
        blk = i0 // TB
        o = i0.to(tl.int64) * ps  # the block's first position along the line
        o_b = i0.to(tl.int64) * st_b
        o_c = i0.to(tl.int64) * st_c
        # this lane's slots: z = delta + bias, dt, u, dL/dy (dt and dL/dy 0 past the segment's end)
        Z = tl.tuple([])
        DTR = tl.tuple([])
        UR = tl.tuple([])
        GYR = tl.tuple([])
        OKB = tl.tuple([])
        for r in tl.static_range(R1):
            ok = OK1[r] & (i0 + STEP[r] < hi)
            dl = tl.load(PDL[r] + o * sd_l, mask=ok, other=0.0).to(tl.float32)
            uu = tl.load(PU[r] + o * su_l, mask=ok, other=0.0).to(tl.float32)
            gy = tl.load(PGY[r] + o * sg_l, mask=ok, other=0.0).to(tl.float32)
            z = dl + BIAS[r]
            Z = Z + (z,)
            DTR = DTR + (tl.where(ok, _softplus(z), 0.0),)
            UR = UR + (uu,)
            GYR = GYR + (gy,)
            OKB = OKB + (ok,)
        # every slot's, from the lane that read it (index t * CB + e)
        DT = tl.tuple([])
        DTU = tl.tuple([])
        GY = tl.tuple([])
        for s in tl.static_range(NS1):
            holder = src + s // R1 * SPREAD
            DT = DT + (tl.gather(DTR[s % R1], holder, 0),)
            DTU = DTU + (tl.gather(DTR[s % R1] * UR[s % R1], holder, 0),)
            GY = GY + (tl.gather(GYR[s % R1], holder, 0),)
        # per (token, state) (index t * NQ + i): B and C
        BV = tl.tuple([])
        CV = tl.tuple([])
        for s in tl.static_range(TB):
            v = i0 + s < hi
            for m in tl.static_range(M):
                ob = o_b + (s * st_b + m * sb_m)
                oc = o_c + (s * st_c + m * sc_m)
                for i in tl.static_range(NQ):
                    vn = SM[i] & v
                    BV = BV + (tl.load(BP[i] + ob, mask=vn, other=0.0).to(tl.float32),)
                    CV = CV + (tl.load(CP[i] + oc, mask=vn, other=0.0).to(tl.float32),)
        # the states entering the block (read once and far larger than L2, about 400 MB for
        # a training step's finest scan: evict-first), then the block's states and decays
        # per (token, channel, state) (index (t * CB + e) * NQ + i)
        H0 = tl.tuple([])
        for ei in tl.static_range(CB * NQ):
            h0 = tl.load(ck_ptr + CKO[ei] + blk * N * d, mask=CS[ei], other=0.0, eviction_policy="evict_first")
            H0 = H0 + (h0.to(tl.float32),)
        HS = tl.tuple([])
        AS = tl.tuple([])
        Hs = H0
        for t in tl.static_range(NT):
            H2 = tl.tuple([])
            for e in tl.static_range(CB):
                for i in tl.static_range(NQ):
                    a = _exp2(DT[t * CB + e] * A2[e * NQ + i])
                    h = a * Hs[e * NQ + i] + DTU[t * CB + e] * BV[t * NQ + i]
                    H2 = H2 + (h,)
                    AS = AS + (a,)
            HS = HS + H2
            Hs = H2
        # last token first: dL/dh_t = gy_t C_t + a_{t+1} dL/dh_{t+1}; per slot the lane's
        # part of the sums over states (of A g a_t h_{t-1} and g B), per (token, state) its
        # part of the channel sums (of g dt u and gy h)
        HP = H0 + HS[: (NT - 1) * CB * NQ]  # the states before each token
        GA = tl.tuple([])
        GB = tl.tuple([])
        X = tl.tuple([])
        for t in tl.static_range(NT - 1, -1, -1):
            SBC = tl.tuple([])
            for i in tl.static_range(NQ):
                SBC = SBC + (tl.zeros([E], tl.float32), tl.zeros([E], tl.float32))
            GN2 = tl.tuple([])
            GAc2 = tl.tuple([])
            GAt = tl.tuple([])
            GBt = tl.tuple([])
            for e in tl.static_range(CB):
                ga = tl.zeros([E], tl.float32)
                gb = tl.zeros([E], tl.float32)
                SBC2 = tl.tuple([])
                for i in tl.static_range(NQ):
                    g = GY[t * CB + e] * CV[t * NQ + i] + GN[e * NQ + i]
                    an = AS[(t * CB + e) * NQ + i] * g
                    gr = an * HP[(t * CB + e) * NQ + i]  # g a_t h_{t-1}
                    ga += gr * A2[e * NQ + i]
                    gb += g * BV[t * NQ + i]
                    GAc2 = GAc2 + (GAc[e * NQ + i] + gr * DT[t * CB + e],)
                    GN2 = GN2 + (an,)
                    sb = SBC[2 * i] + g * DTU[t * CB + e]
                    sc = SBC[2 * i + 1] + GY[t * CB + e] * HS[(t * CB + e) * NQ + i]
                    SBC2 = SBC2 + (sb, sc)
                SBC = SBC2
                GAt = GAt + (ga,)
                GBt = GBt + (gb,)
            GA = GAt + GA
            GB = GBt + GB
            GN = GN2
            GAc = GAc2
            X = SBC + X
        # dL/dB, dL/dC: sum r of X is token r // (2 NQ), state ((r // 2) % NQ) * G + q, of B
        # for even r, of C for odd r
        S = _sum_scatter(X, lane, NX, CT, G)
        if RED == RED_VALUES:
            for r in tl.static_range(R):
                ok = OK2[r] & (i0 + STEP2[r] < hi)
                tl.atomic_add(PBC[r] + 2 * (o * sgb_l), S[r], mask=ok, sem="relaxed")
        else:
            for t in tl.static_range(TL):
                in_seg = i0 + STEP2[t] < hi
                for i in tl.static_range(NQ):
                    _add_pair(PBC[t * NQ + i] + 2 * (o * sgb_l), S[2 * (t * NQ + i)], S[2 * (t * NQ + i) + 1],
                              SM[i] & in_seg, RED == RED_VECTOR)
        # this lane's slots: dL/du (atomic over directions), dL/d(delta)
        SA = _sum_scatter(GA, lane, NS1, G, 1)
        SB = _sum_scatter(GB, lane, NS1, G, 1)
        GD2 = tl.tuple([])
        GBIAS2 = tl.tuple([])
        for r in tl.static_range(R1):
            ok = OKB[r] & own1
            tl.atomic_add(PGU[r] + o * sgu_l, DTR[r] * SB[r] + DSK[r] * GYR[r], mask=ok, sem="relaxed")
            gdl = tl.where(ok, (UR[r] * SB[r] + SA[r] * LN2) * _sigmoid(Z[r]), 0.0)
            tl.store(PGDL[r] + o * sgd_l, gdl.to(gdl_ptr.dtype.element_ty), mask=ok)
            GD2 = GD2 + (GD[r] + tl.where(ok, GYR[r] * UR[r], 0.0),)
            GBIAS2 = GBIAS2 + (GBIAS[r] + gdl,)
        GD = GD2
        GBIAS = GBIAS2
    # the lane's dL/dA partials; dL/dD and dL/d(delta_bias) per channel (rows N, N + 1),
    # summed over the lane's slots and then over the group by the exchange
    first3, own3 = _scatter_slots(lane, 2, G, 1)
    for e in tl.static_range(CB):
        c = c0 + e
        for i in tl.static_range(NQ):
            n = i * G + q
            tl.atomic_add(part_ptr + prow * (N + 2) * d + n * d + c, GAc[e * NQ + i], mask=CS[e * NQ + i],
                          sem="relaxed")
        gd = tl.zeros([E], tl.float32)
        gbias = tl.zeros([E], tl.float32)
        for r in tl.static_range(R1):
            gd += tl.where(CH[r] == e, GD[r], 0.0)
            gbias += tl.where(CH[r] == e, GBIAS[r], 0.0)
        S = _sum_scatter((gd, gbias), lane, 2, G, 1)
        for r in tl.static_range(max(1, 2 // G)):
            tl.atomic_add(part_ptr + prow * (N + 2) * d + (N + first3 + r) * d + c, S[r],
                          mask=own3 & lmask & (c < d), sem="relaxed")


# ------------------------------------------------------------------------- host


def _check(u, delta, A, B, C, D, delta_bias, height: int, width: int) -> None:
    check_cross_scan_args(u, delta, A, B, C, D, delta_bias, height, width)
    _check_tensors(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias)


def _check_tensors(**tensors: torch.Tensor) -> None:
    """Every tensor in a dtype the kernels read, on u's device."""
    u = tensors["u"]
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"the triton scan backend takes float32, bfloat16 or float16 tensors; {name} is {t.dtype} "
                "(use backend='reference' for other dtypes)"
            )
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}; put every input on one device")


def _steps(steps: int, M: int) -> int:
    return max(1, steps // M)


def _segments(H: int, W: int, b: int, K: int, d: int, M: int) -> tuple[int, int]:
    """(SEG, NS): steps per chunk (a multiple of the backward's block) and chunk slots
    per line, so that a forward launch has about TARGET_LANES lanes; lines of at most
    WHOLE_LINE_STEPS steps are not cut, and no line is cut in two: three chunks instead
    (two measured slower than the better of one and three in 13 of the 15 fusing scans
    of BENCHMARKS.md session 18, H200)."""
    longest = max(H, W)
    unit = _steps(BWD_STEPS, M)
    lanes = longest * b * K * triton.cdiv(d, FWD_CB[M - 1])
    splits = max(1, min(triton.cdiv(TARGET_LANES, lanes), triton.cdiv(longest, unit)))
    if longest <= WHOLE_LINE_STEPS:
        splits = 1
    elif splits == 2:
        splits = min(3, triton.cdiv(longest, unit))
    seg = triton.cdiv(triton.cdiv(longest, splits), unit) * unit
    return seg, triton.cdiv(longest, seg)


def _combine_chunks(local, dts, A, H, W, NL, ns, d, K, reverse: bool) -> torch.Tensor:
    """Exclusive scan over the chunk slots of every direction (``_chunk_combine_kernel``)."""
    out = torch.empty_like(local)
    N = local.shape[-1]
    if NL * ns <= SHORT_SLOTS:
        rows, states, warps = SHORT_ROWS, SHORT_STATES, SHORT_WARPS
    else:
        rows, states, warps = COMBINE_ROWS, COMBINE_STATES, COMBINE_WARPS
    _chunk_combine_kernel[(local.shape[0], triton.cdiv(d * N, states))](
        local, dts, A, out, H, W, N, NL, ns, d, K=K, REVERSE=reverse, JB=rows, SB=states, num_warps=warps
    )
    return out


def _checkpoint_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the backward stores the state entering every block (``ck``):
    bfloat16 for bfloat16 inputs, float32 otherwise. Those checkpoints are the largest
    memory traffic of a training step's scans (written once by the sweep, read once by
    ``_bwd_kernel``: 5.5 GB per step in float32); each block's states are recomputed in
    float32 from its own checkpoint, so the rounding (relative 2**-9, that of every
    activation bfloat16 autocast saves) does not accumulate from block to block."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _keeps_checkpoints(dtype: torch.dtype) -> bool:
    """Whether a scan that needs gradients stores the block checkpoints in its forward
    (``MODE_Y`` with ``CK``: its states are the ones the backward needs), so that the
    backward's walk over the chunks computes only their local adjoints (``MODE_ADJOINT``:
    no state recurrence, no loads of u and B, no stores). Then the checkpoints are held
    from the forward to the backward: for bfloat16 inputs, whose checkpoints are bfloat16
    (the peak of a training step at batch 20 and 229x229 goes from 3.5 to 5.9 GiB,
    BENCHMARKS.md session 24); float32 checkpoints would take twice that, so those are
    still made by the backward (``MODE_SWEEP``), one scan at a time. Only where autograd
    records the scan (not under no_grad, whatever the inputs require)."""
    return _checkpoint_dtype(dtype) == torch.bfloat16


def _unit_states(B: torch.Tensor, C: torch.Tensor) -> bool:
    """Whether B and C have state stride 1 (the network's layout): the kernels then read
    a token's states at constant offsets."""
    return B.stride(-2) == 1 and C.stride(-2) == 1


def _state_loads(B: torch.Tensor, C: torch.Tensor) -> int:
    """How the forward modes read B and C (``VEC``): by vector loads where both have
    state stride 1, one dtype, 16-byte aligned data and every other stride a multiple of
    16 bytes (the layout of :func:`s4fusion.ops.projection_rows`' projection):
    float32 values, or bfloat16 states in pairs (N even); else one load per state."""
    if not VECTOR_STATES or not _unit_states(B, C) or B.dtype != C.dtype:
        return VEC_NONE.value
    N = B.shape[-2]
    if B.dtype == torch.float32:
        kind = VEC_VALUES.value
    elif B.dtype == torch.bfloat16 and N % 2 == 0:
        kind = VEC_WORDS.value
    else:
        return VEC_NONE.value
    per = 16 // B.element_size()
    for t in (B, C):
        strides = [st for i, st in enumerate(t.stride()) if i != t.dim() - 2 and t.shape[i] > 1]
        if t.data_ptr() % 16 or any(st % per for st in strides):
            return VEC_NONE.value
    return kind


def _group(groups: int, tokens: int, sums: int, red: int) -> int:
    """Lane groups whose channel sums of dL/dB and dL/dC (``sums`` per lane and block, of
    ``tokens``) are added in registers before an atomic add: the largest power of two
    that divides the groups per line, at most BWD_GROUP and within a warp, and (see
    :func:`_sum_scatter`) with RED_VALUES dividing ``sums`` unless that is a power of two,
    otherwise dividing ``tokens`` (every lane ends with the sums of whole tokens)."""
    ct = min(groups & -groups, BWD_GROUP, BWD_LANES // BWD_PARTS, 32 // BWD_PARTS)
    if red != RED_VALUES.value:
        return min(ct, tokens & -tokens)
    if sums & (sums - 1):
        ct = min(ct, sums & -sums)
    return ct


def _reductions(device: torch.device) -> int:
    """How the backward kernel adds dL/dB and dL/dC (``RED``): by vector reductions of
    pairs on GPUs of compute capability 9.0 and later, else one value at a time (Triton's
    interpreter, which has no inline PTX: FAST_MATH, and older GPUs)."""
    if FAST_MATH.value and torch.cuda.get_device_capability(device)[0] >= 9:
        return RED_VECTOR.value
    return RED_VALUES.value


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """x's shape with a last dimension of 2, whose layout (:func:`_new_like`) keeps x's
    order with the pair innermost (the expanded view's stride 0): for two tensors of x's
    shape and layout, interleaved, each element of the second after the first's."""
    return x.unsqueeze(-1).expand(*x.shape, 2)


def _zeros_like(device: torch.device, *likes: torch.Tensor) -> list[torch.Tensor]:
    """Float32 zero tensors of the shapes and layouts of ``likes`` (as :func:`_new_like`;
    any device, e.g. meta tensors), as views of one buffer zeroed by one fill, each
    starting 256-byte aligned."""
    starts, total = [], 0
    for x in likes:
        starts.append(total)
        total += triton.cdiv(x.numel(), 64) * 64
    flat = torch.zeros(total, device=device, dtype=torch.float32)
    return [_dense_as(flat[start : start + x.numel()], x) for start, x in zip(starts, likes)]


def _dense_as(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``flat`` (x.numel() elements) viewed with x's shape, its dimensions ordered in memory
    as x's are (outermost: largest stride; ties keep their order)."""
    order = sorted(range(x.dim()), key=x.stride, reverse=True)
    return flat.view([x.shape[i] for i in order]).permute([order.index(i) for i in range(x.dim())])


def _in_dtypes(B, C, g_B, g_C) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dB and dL/dC (float32, interleaved: :func:`_pairs`) in B's and C's dtypes:
    float32 as they are; bfloat16 or float16, where B and C are sibling views of one
    storage (the network's projection), into one buffer laid out as that storage, by one
    copy (:func:`.grad_buffers.sibling_gradients`: ``ops.split_projection`` completes
    it into the projection's gradient in place), else each into a tensor of its layout."""
    if B.dtype == C.dtype != torch.float32 and C.storage_offset() > B.storage_offset():  # (C after B: one view)
        shared = sibling_gradients(B, C)
        if shared is not None:
            out_B, out_C = shared
            both = out_B.as_strided((*B.shape, 2), (*B.stride(), C.storage_offset() - B.storage_offset()))
            both.copy_(g_B.as_strided((*g_B.shape, 2), (*g_B.stride(), 1)))
            return out_B, out_C
    pairs = ((B, g_B), (C, g_C))
    return tuple(g if x.dtype == torch.float32 else _new_like(x, x.dtype, zero=False).copy_(g) for x, g in pairs)


def _new_like(x: torch.Tensor, dtype: torch.dtype, zero: bool) -> torch.Tensor:
    """A dense tensor of x's shape whose dimensions are ordered in memory as x's are
    (for any strides of x: a view of a larger tensor gets a dense tensor of the same
    layout, e.g. channels or states innermost, as the network passes them)."""
    alloc = torch.zeros if zero else torch.empty
    return _dense_as(alloc(x.numel(), device=x.device, dtype=dtype), x)


def _parameters(A, D, delta_bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A, D and delta_bias as the kernels read them: A as it is (they load it in float32
    and multiply by log2(e) themselves), D and delta_bias in float32, each contiguous."""
    f32 = torch.float32
    return A.detach().contiguous(), D.detach().to(f32).contiguous(), delta_bias.detach().to(f32).contiguous()


def _forward(u, dl, w, A, B, C, D, delta_bias, height, width, keep: bool):
    """The forward passes (``MODE_END``, the chunk combine, ``MODE_Y``) -> the output in
    float32 (b, M, d, L), and what the backward reads: the chunks' start states and dt
    sums, the block states (with ``keep``: ``_keeps_checkpoints``) and the launch plan.
    ``w`` None: ``dl`` is delta (b, M, K, d, L); else ``dl`` is the low-rank delta
    (b, M, K, L, R) and ``w`` (K, d, R) its up-projection (forward only)."""
    b, M, d, L = u.shape
    K, N = dl.shape[2], A.shape[1]
    H, W = int(height), int(width)
    dev, f32 = u.device, torch.float32
    a, dsk, bias = _parameters(A, D, delta_bias)
    if w is None:
        lowr, w, dl_strides = 0, a, dl.stride()  # (w_ptr unused)
    else:
        lowr, w, dl_strides = dl.shape[4], w.contiguous(), dl.transpose(3, 4).stride()
    NL = max(H, W)
    seg, ns = _segments(H, W, b, K, d, M)
    cb = FWD_CB[M - 1]
    grid = (triton.cdiv(NL * triton.cdiv(d, cb), FWD_LANES) * ns, b * K)
    unit, vec = _unit_states(B, C), _state_loads(B, C)  # (the backward's sweep reads them alike)
    tb = _steps(BWD_STEPS, M)  # (the backward's block)
    nblk = triton.cdiv(NL, tb)
    consts = dict(K=K, M=M, N=N, CB=cb, E=FWD_LANES, PF=FWD_PREFETCH[M - 1], UNIT_N=unit, VEC=vec, LOWR=lowr,
                  num_warps=max(1, FWD_LANES // 32))  # fmt: skip
    no_ck = dict(CK=False, TB=FWD_UNROLL, CKB=FWD_UNROLL)
    sizes = (H, W, NL, ns, seg, nblk, d)
    out = _new_like(u, f32, zero=True)
    strides = (*u.stride(), *dl_strides, *B.stride(), *C.stride(), *out.stride())
    state = torch.empty(b * K, NL, ns, d, N, device=dev, dtype=f32)
    dts = torch.empty(b * K, NL, ns, d, device=dev, dtype=f32)
    args = (u, dl, a, B, C, dsk, bias, w)
    _fwd_kernel[grid](*args, state, dts, out, state, state, *sizes, *strides, MODE=MODE_END, **no_ck, **consts)
    start = _combine_chunks(state, dts, a, H, W, NL, ns, d, K, reverse=False)
    del state
    if keep:
        ck = torch.empty(b * K, NL, nblk, N, d, device=dev, dtype=_checkpoint_dtype(u.dtype))
        blocks = dict(CK=True, TB=math.gcd(FWD_UNROLL, tb), CKB=tb)
    else:
        ck, blocks = start, no_ck  # (ck_ptr unused without CK)
    _fwd_kernel[grid](*args, start, dts, out, ck, start, *sizes, *strides, MODE=MODE_Y, **blocks, **consts)
    return out, start, dts, ck, (H, W, seg, ns, unit, vec)


class _CrossScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, height, width, recorded):  # type: ignore[override]
        grads = any(ctx.needs_input_grad[:7])
        keep = recorded and grads and _keeps_checkpoints(u.dtype)  # (recorded: grad mode was on at the call)
        out, start, dts, ck, plan = _forward(u, delta, None, A, B, C, D, delta_bias, height, width, keep)
        if grads:
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, start, dts, *((ck,) if keep else ()))
            ctx.plan = plan
        return out if u.dtype == torch.float32 else out.to(u.dtype)

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        u, delta, A, B, C, D, delta_bias, start, dts, *kept = ctx.saved_tensors
        H, W, seg, ns, unit, vec = ctx.plan
        b, M, d, L = u.shape
        K, N = delta.shape[2], A.shape[1]
        dev = u.device
        a, dsk, bias = _parameters(A, D, delta_bias)
        NL = max(H, W)
        tb = _steps(BWD_STEPS, M)
        nblk = triton.cdiv(NL, tb)
        args = (u, delta, a, B, C, dsk, bias, a)  # (w_ptr unused)
        sizes = (H, W, NL, ns, seg, nblk, d)
        in_strides = (*u.stride(), *delta.stride(), *B.stride(), *C.stride(), *gout.stride())
        # the adjoint every chunk passes back from its own outputs, and (unless the forward
        # kept them: _keeps_checkpoints) the state entering every block
        if kept:
            (ck,) = kept
        else:
            ck = torch.empty(b * K, NL, nblk, N, d, device=dev, dtype=_checkpoint_dtype(u.dtype))
        local = torch.empty_like(start)
        grid = (triton.cdiv(NL * triton.cdiv(d, SWEEP_CB), FWD_LANES) * ns, b * K)
        _fwd_kernel[grid](*args, start, dts, gout, ck, local, *sizes, *in_strides,
                          MODE=MODE_ADJOINT if kept else MODE_SWEEP, CK=not kept, CKB=tb,
                          K=K, M=M, N=N, CB=SWEEP_CB, E=FWD_LANES, TB=math.gcd(FWD_UNROLL, tb),
                          PF=bool(kept) and ADJOINT_PF[M - 1],
                          UNIT_N=unit, VEC=vec, LOWR=0, num_warps=max(1, FWD_LANES // 32))  # fmt: skip
        arriving = _combine_chunks(local, dts, a, H, W, NL, ns, d, K, reverse=True)
        del local
        g_delta = _new_like(delta, delta.dtype, zero=False)
        # (one fill for the three; dL/dB and dL/dC neighbours: the kernel may add a token's
        # and state's two sums at once)
        parts_like = torch.empty(PART_SLOTS.value, K, N + 2, d, device="meta")
        g_u, pairs, parts = _zeros_like(dev, u, _pairs(B), parts_like)
        g_B, g_C = pairs[..., 0], pairs[..., 1]
        red = _reductions(dev)
        out_strides = (*g_delta.stride(), *g_u.stride(), *(st // 2 for st in g_B.stride()))  # (g_B's in pairs)
        nq = triton.cdiv(d, BWD_CB)  # lane groups per line
        _bwd_kernel[(triton.cdiv(NL * nq * BWD_PARTS, BWD_LANES) * ns, b * K)](
            u, delta, a, B, C, dsk, bias, gout, ck, arriving, parts, g_delta, g_u, g_B,
            *sizes, *in_strides, *out_strides,
            K=K, M=M, N=N, E=BWD_LANES, TB=tb, CT=_group(nq, tb * M, 2 * tb * M * triton.cdiv(N, BWD_PARTS), red),
            CB=BWD_CB, G=BWD_PARTS, RED=red, num_warps=max(1, BWD_LANES // 32),
        )  # fmt: skip
        sums = parts.sum(0)  # (K, N + 2, d)
        return (
            g_u.to(u.dtype),
            g_delta,
            sums[:, :N].transpose(1, 2).reshape(K * d, N).to(A.dtype),
            *_in_dtypes(B, C, g_B, g_C),
            sums[:, N].reshape(K * d).to(D.dtype),
            sums[:, N + 1].reshape(K * d).to(delta_bias.dtype),
            None,
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
    with launch_device(u):
        return _CrossScan.apply(u, delta, A, B, C, D, delta_bias, height, width, torch.is_grad_enabled())


def cross_scan_lowrank_triton(
    u: torch.Tensor,
    low: torch.Tensor,
    dt_weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    height: int,
    width: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`cross_scan_triton` of the delta up-projected from the low-rank delta:
    ``low`` (b, M, K, L, R), ``dt_weight`` (K, d, R); see
    :func:`s4fusion.ops.reference.cross_scan_lowrank_ref`. Without gradients (and in
    autocast's dtype where autocast is on) the scan kernels compute each delta from
    ``low`` and ``dt_weight`` themselves, in float32 (neither the weight nor the delta
    rounded to ``low``'s dtype, as the composed ops round them), so the (b, M, K, d, L)
    delta is never written (it is the largest tensor a scan reads); otherwise
    :func:`dt_project_triton`, then the scan. Returns (b, M, d, L) in ``out_dtype``
    (default ``u.dtype``; float32 returns the kernels' float32 sums without a conversion)."""
    check_cross_scan_lowrank_args(u, low, dt_weight, A, B, C, D, delta_bias, height, width)
    lower = autocast_dtype(u.device.type)
    inputs = (u, low, dt_weight, A, B, C, D, delta_bias)
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if grads or (lower is not None and low.dtype != lower):
        out = cross_scan_triton(u, dt_project_triton(low, dt_weight), A, B, C, D, delta_bias, height, width)
    else:
        _check_tensors(u=u, low=low, dt_weight=dt_weight, A=A, B=B, C=C, D=D, delta_bias=delta_bias)
        with launch_device(u):
            out = _forward(u, low, dt_weight, A, B, C, D, delta_bias, height, width, keep=False)[0]
    return out.to(out_dtype or u.dtype)
