"""Plain-PyTorch reference of the selective scan and of the 2-D cross scan.

This module is the *specification*: every fast backend is tested against it.
It runs on any device and dtype; the recurrent state is kept in float32 (or in
the input dtype when that is wider, e.g. float64).

Notation (RELEASED-MODEL-FACTS.md section 3):

* ``selective_scan_ref`` is mamba's ``selective_scan_fn`` as S4Fusion calls it
  (``z=None``, ``delta_softplus=True``): a channel ``ch`` uses B/C group
  ``ch // (channels // groups)``; discretisation ``Abar = exp(delta * A)``,
  ``Bbar = delta * B``.
* ``cross_scan_ref`` is the SS2D / Cross SS2D core in *map layout*: inputs are
  given per position in row-major order, the op unfolds the four scan
  directions, interleaves the modalities (infrared first) per direction, scans,
  un-interleaves and sums the four directions back in row-major order.
* ``dt_project_ref`` is the per-direction up-projection of the low-rank delta
  (VMamba's ``dt_projs``), which produces ``cross_scan``'s delta.
* ``layer_norm_ref`` is LayerNorm over the channels (last dimension), optionally
  times a SiLU gate, as the network's blocks apply it.
* ``cross_scan_state_ref`` is one direction of ``cross_scan_ref`` started from
  a given state, returning the final state (inference only), so that a map can
  be scanned in strips with the state carried across them exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_DIRECTIONS = 4


ROW_ALIGN = 8  # rows: 16 bytes of bfloat16 (and a multiple of 16 bytes of float32)


def projection_rows(dt_rank: int, d_state: int) -> tuple[int, int, int, int]:
    """Where a scan block's input projection puts B, C and the low-rank delta, per
    direction: (rows, b, c, low). B is rows [b, b + N), C [c, c + N), the low-rank delta
    [low, low + R); nothing reads the other rows. b, c and rows are multiples of 8, so that in a
    token-major projection (..., L, K, rows) every token's B and C start 16-byte aligned in
    float32 and in bfloat16 and all their strides but the states' are multiples of 16
    bytes: the layout the Triton backend reads with vector loads (any layout is correct)."""
    c = -(-d_state // ROW_ALIGN) * ROW_ALIGN
    low = c + d_state
    rows = -(-(low + dt_rank) // ROW_ALIGN) * ROW_ALIGN
    return rows, 0, c, low


def check_cross_scan_args(u, delta, A, B, C, D, delta_bias, height: int, width: int) -> None:
    """Check the shapes of a :func:`cross_scan_ref` call (every backend shares this
    contract); raises ValueError naming the argument, the expected and the given shape."""
    if u.dim() != 4:
        raise ValueError(f"cross_scan: u must be (b, M, d, L), got shape {tuple(u.shape)}")
    b, M, d, L = u.shape
    if delta.dim() != 5 or delta.shape[:2] != (b, M) or delta.shape[3:] != (d, L):
        raise ValueError(f"cross_scan: delta must be (b, M, K, d, L) = ({b}, {M}, K, {d}, {L}), got {tuple(delta.shape)}")
    _check_scan_operands(u, delta.shape[2], "delta.shape[2]", A, B, C, D, delta_bias, height, width)


def _check_scan_operands(u, K: int, K_from: str, A, B, C, D, delta_bias, height: int, width: int) -> None:
    """The checks of a scan's arguments other than its delta, given u (b, M, d, L) and the
    number of directions K (read from ``K_from``)."""
    b, M, d, L = u.shape
    if not 1 <= K <= NUM_DIRECTIONS:
        raise ValueError(f"cross_scan: K ({K_from}) must be 1..{NUM_DIRECTIONS}, got {K}")
    if A.dim() != 2 or A.shape[0] != K * d:
        raise ValueError(f"cross_scan: A must be (K*d, N) = ({K * d}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, M, K, N, L):
            raise ValueError(f"cross_scan: {name} must be (b, M, K, N, L) = {(b, M, K, N, L)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if tuple(t.shape) != (K * d,):
            raise ValueError(f"cross_scan: {name} must be (K*d,) = ({K * d},), got {tuple(t.shape)}")
    if height * width != L:
        raise ValueError(f"cross_scan: height*width = {height}*{width} = {height * width} does not match L = {L}")


def check_cross_scan_state_args(u, delta, A, B, C, delta_bias, height: int, width: int, direction: int, h0) -> None:
    """Check a :func:`cross_scan_state_ref` call (every backend shares this
    contract): the shapes, raising ValueError naming the argument, the expected
    and the given shape, and that no gradient is asked for (the op has no
    backward), raising RuntimeError."""
    if u.dim() != 4:
        raise ValueError(f"cross_scan_state: u must be (b, M, d, L), got shape {tuple(u.shape)}")
    b, M, d, L = u.shape
    if tuple(delta.shape) != (b, M, d, L):
        raise ValueError(f"cross_scan_state: delta must be (b, M, d, L) = {(b, M, d, L)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"cross_scan_state: A must be (d, N) = ({d}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, M, N, L):
            raise ValueError(f"cross_scan_state: {name} must be (b, M, N, L) = {(b, M, N, L)}, got {tuple(t.shape)}")
    if tuple(delta_bias.shape) != (d,):
        raise ValueError(f"cross_scan_state: delta_bias must be (d,) = ({d},), got {tuple(delta_bias.shape)}")
    if tuple(h0.shape) != (b, d, N):
        raise ValueError(f"cross_scan_state: h0 must be (b, d, N) = {(b, d, N)}, got {tuple(h0.shape)}")
    if not h0.is_floating_point():
        raise ValueError(f"cross_scan_state: h0 must be a floating tensor, got {h0.dtype}")
    if height * width != L:
        raise ValueError(f"cross_scan_state: height*width = {height}*{width} = {height * width} does not match L = {L}")
    if direction not in range(NUM_DIRECTIONS):
        raise ValueError(f"cross_scan_state: direction must be 0..{NUM_DIRECTIONS - 1}, got {direction!r}")
    tensors = (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("delta_bias", delta_bias), ("h0", h0))
    names = ", ".join(name for name, t in tensors if t.requires_grad)
    if torch.is_grad_enabled() and names:
        raise RuntimeError(
            f"cross_scan_state is inference-only (it has no backward), but inputs require grad ({names}): "
            "call it under torch.no_grad() or torch.inference_mode(), or pass detached tensors"
        )


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _selective_scan(u, delta, A, B, C, delta_bias, h0):
    """The recurrence of :func:`selective_scan_ref` without the D skip, from the
    state ``h0`` (b, ch, N) in the state dtype; other shapes as there. Returns the
    outputs (b, ch, T) and the state after the last step (b, ch, N), both in the
    state dtype."""
    b, ch, T = u.shape
    groups = B.shape[1]
    if ch % groups:
        raise ValueError(f"channels ({ch}) must be a multiple of the B/C groups ({groups})")
    sd = h0.dtype
    dt = F.softplus(delta.to(sd) + delta_bias.to(sd)[None, :, None])  # (b, ch, T)
    Bx = B.to(sd).repeat_interleave(ch // groups, dim=1)  # (b, ch, N, T)
    Cx = C.to(sd).repeat_interleave(ch // groups, dim=1)
    dA = torch.exp(dt.unsqueeze(2) * A.to(sd)[None, :, :, None])  # (b, ch, N, T)
    dBu = (dt * u.to(sd)).unsqueeze(2) * Bx  # (b, ch, N, T)
    h = h0
    ys = []
    for t in range(T):
        h = dA[..., t] * h + dBu[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    return torch.stack(ys, dim=-1), h


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
) -> torch.Tensor:
    """Selective scan with softplus on ``delta + delta_bias``.

    Shapes: ``u``, ``delta`` (b, ch, T); ``A`` (ch, N); ``B``, ``C`` (b, G, N, T)
    with ``ch % G == 0``; ``D``, ``delta_bias`` (ch,). Returns (b, ch, T) in
    ``u.dtype``.
    """
    b, ch, _ = u.shape
    sd = _state_dtype(u.dtype)
    h0 = torch.zeros(b, ch, B.shape[2], dtype=sd, device=u.device)
    y, _ = _selective_scan(u, delta, A, B, C, delta_bias, h0)
    y = y + D.to(sd)[None, :, None] * u.to(sd)
    return y.to(u.dtype)


def direction_orders(height: int, width: int, device=None) -> torch.Tensor:
    """(4, L) long tensor: ``orders[k, t]`` is the row-major position of the t-th
    token of scan direction k (0 row-major, 1 column-major, 2 and 3 their
    reversals)."""
    L = height * width
    row = torch.arange(L, device=device)
    col = torch.arange(L, device=device).view(height, width).t().reshape(-1)
    return torch.stack([row, col, row.flip(0), col.flip(0)])


def cross_scan_ref(
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
    """SS2D (M = 1) or Cross SS2D (M = 2) scan core, map layout.

    Args:
        u: (b, M, d, L) scan input per modality (M = 2: infrared first), L = H*W
            positions in row-major order.
        delta: (b, M, K, d, L) raw delta of direction k at each position (before
            bias and softplus).
        A: (K*d, N) state matrix (negative), row ``k*d + c``.
        B, C: (b, M, K, N, L) input/output projections of direction k.
        D, delta_bias: (K*d,).
    Returns:
        (b, M, d, L): for each modality, the sum over the K directions of the scan
        outputs put back at their row-major positions.
    """
    check_cross_scan_args(u, delta, A, B, C, D, delta_bias, height, width)
    b, M, d, L = u.shape
    K = delta.shape[2]
    N = A.shape[1]
    order = direction_orders(height, width, u.device)[:K]  # (K, L)
    # Unfold directions: (b, M, K, d, L) in scan order.
    u_seq = u[:, :, None, :, :].expand(b, M, K, d, L)
    u_seq = torch.gather(u_seq, 4, order[None, None, :, None, :].expand(b, M, K, d, L))
    dt_seq = torch.gather(delta, 4, order[None, None, :, None, :].expand(b, M, K, d, L))
    B_seq = torch.gather(B, 4, order[None, None, :, None, :].expand(b, M, K, N, L))
    C_seq = torch.gather(C, 4, order[None, None, :, None, :].expand(b, M, K, N, L))

    # Interleave modalities along the token axis: token t of modality m -> t*M + m.
    def interleave(x: torch.Tensor) -> torch.Tensor:  # (b, M, K, c, L) -> (b, K*c, L*M)
        x = x.permute(0, 2, 3, 4, 1)  # (b, K, c, L, M)
        return x.reshape(b, K * x.shape[2], L * M)

    y = selective_scan_ref(
        interleave(u_seq),
        interleave(dt_seq),
        A,
        interleave(B_seq).view(b, K, N, L * M),
        interleave(C_seq).view(b, K, N, L * M),
        D,
        delta_bias,
    )
    y = y.view(b, K, d, L, M).permute(0, 4, 1, 2, 3)  # (b, M, K, d, L) in scan order
    out = torch.zeros(b, M, d, L, dtype=y.dtype, device=y.device)
    for k in range(K):
        out.index_add_(3, order[k], y[:, :, k])
    return out


def cross_scan_state_ref(
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
    """One scan direction of :func:`cross_scan_ref` from a given state, map layout
    (inference only: refuses inputs that require grad while grad mode is on).

    Exactly the direction-``direction`` part of :func:`cross_scan_ref` (same
    order, modality interleaving, softplus and state dtype) except that the
    state starts at ``h0`` instead of zero and the D skip is not added. Scanning
    a map in consecutive pieces of the direction's sequence, each started from
    the previous piece's final state, reproduces the scan of the whole map.

    Args:
        u: (b, M, d, L) scan input per modality (M = 2: infrared first), L = H*W
            positions in row-major order.
        delta: (b, M, d, L) raw delta of this direction (before bias and softplus).
        A: (d, N) state matrix (negative).
        B, C: (b, M, N, L) input/output projections of this direction.
        delta_bias: (d,).
        direction: 0..3 as :func:`direction_orders` (0 row-major, 1 column-major,
            2 and 3 their reversals).
        h0: (b, d, N) state entering the first step of the direction's sequence
            (any float dtype; converted to the state dtype).
    Returns:
        y: (b, M, d, L) in ``u.dtype``, the scan outputs at their row-major
            positions (no D skip).
        h_last: (b, d, N) in the state dtype (float64 for float64 ``u``, else
            float32), the state after the last step.
    """
    check_cross_scan_state_args(u, delta, A, B, C, delta_bias, height, width, direction, h0)
    b, M, d, L = u.shape
    order = direction_orders(height, width, u.device)[direction]  # (L,)

    # Scan order with the modalities interleaved: token t of modality m -> t*M + m.
    def interleave(x: torch.Tensor) -> torch.Tensor:  # (b, M, c, L) -> (b, c, L*M)
        return x[..., order].permute(0, 2, 3, 1).reshape(b, x.shape[2], L * M)

    y, h_last = _selective_scan(
        interleave(u),
        interleave(delta),
        A,
        interleave(B)[:, None],
        interleave(C)[:, None],
        delta_bias,
        h0.to(_state_dtype(u.dtype)),
    )
    y = y.to(u.dtype).view(b, d, L, M).permute(0, 3, 1, 2)  # (b, M, d, L) in scan order
    out = torch.empty(b, M, d, L, dtype=u.dtype, device=u.device)
    return out.index_copy_(3, order, y), h_last


def check_dt_project_args(low: torch.Tensor, weight: torch.Tensor) -> None:
    """Check the shapes of a :func:`dt_project_ref` call (every backend shares this
    contract); raises ValueError naming the argument, the expected and the given shape."""
    if low.dim() != 5:
        raise ValueError(f"dt_project: low must be (b, M, K, L, R), got shape {tuple(low.shape)}")
    K, R = low.shape[2], low.shape[4]
    if weight.dim() != 3 or weight.shape[0] != K or weight.shape[2] != R:
        raise ValueError(f"dt_project: weight must be (K, d, R) = ({K}, d, {R}), got {tuple(weight.shape)}")
    if weight.device != low.device:
        raise ValueError(f"dt_project: weight is on {weight.device} but low is on {low.device}")


def dt_project_ref(low: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The up-projection of the low-rank delta, per scan direction k:
    ``delta[b, m, k] = (low[b, m, k] @ weight[k].T).T``.

    low (b, M, K, L, R), weight (K, d, R) -> delta (b, M, K, d, L) in low's dtype
    (the weight is cast to it, as autocast does for a bfloat16 ``low``), with its
    channels innermost in memory, as the scans read it."""
    check_dt_project_args(low, weight)
    return (low @ weight.to(low.dtype).transpose(1, 2)).transpose(3, 4)


def check_cross_scan_lowrank_args(
    u, low, dt_weight, A, B, C, D, delta_bias, height: int, width: int
) -> None:
    """Check the shapes of a :func:`cross_scan_lowrank_ref` call (every backend shares
    this contract); raises ValueError naming the argument, the expected and the given shape."""
    if u.dim() != 4:
        raise ValueError(f"cross_scan_lowrank: u must be (b, M, d, L), got shape {tuple(u.shape)}")
    b, M, d, L = u.shape
    if low.dim() != 5 or low.shape[:2] != (b, M) or low.shape[3] != L:
        raise ValueError(f"cross_scan_lowrank: low must be (b, M, K, L, R) = ({b}, {M}, K, {L}, R), "
                         f"got {tuple(low.shape)}")  # fmt: skip
    K, R = low.shape[2], low.shape[4]
    if tuple(dt_weight.shape) != (K, d, R):
        raise ValueError(f"cross_scan_lowrank: dt_weight must be (K, d, R) = {(K, d, R)}, got {tuple(dt_weight.shape)}")
    _check_scan_operands(u, K, "low.shape[2]", A, B, C, D, delta_bias, height, width)


def cross_scan_lowrank_ref(
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
    """:func:`cross_scan_ref` of the delta that :func:`dt_project_ref` up-projects from
    the low-rank delta: low (b, M, K, L, R), dt_weight (K, d, R); the other arguments
    as :func:`cross_scan_ref`'s; the output in ``out_dtype`` (default u's)."""
    check_cross_scan_lowrank_args(u, low, dt_weight, A, B, C, D, delta_bias, height, width)
    out = cross_scan_ref(u, dt_project_ref(low, dt_weight), A, B, C, D, delta_bias, height, width)
    return out if out_dtype is None else out.to(out_dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on ``device_type``, None when it is off
    (the torch >= 2.4 spelling, then the older ones)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    gate: torch.Tensor | None = None,
    matmul_input: bool = False,
) -> torch.Tensor:
    """``F.layer_norm`` of x (..., C) over C, times ``F.silu(gate)`` when a gate (x's
    shape) is given: SS2D's ``out_norm(y) * silu(z)``. Under autocast the result is
    float32, or with ``matmul_input`` (for a result that only a matrix product reads)
    the float32 result cast to autocast's dtype: what the product would cast it to."""
    out = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    out = out if gate is None else out * F.silu(gate)
    lower = autocast_dtype(x.device.type) if matmul_input else None
    return out if lower is None else out.to(lower)


def _check_bias_args(op: str, x: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be (b, C, H, W), got shape {tuple(x.shape)}")
    if bias.shape != (x.shape[1],):
        raise ValueError(f"{op}: bias must be ({x.shape[1]},) for x {tuple(x.shape)}, got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")


def check_bias_silu_args(x: torch.Tensor, bias: torch.Tensor) -> None:
    """Check the shapes of a :func:`bias_silu_ref` call (every backend shares this
    contract); raises ValueError naming the argument, the expected and the given shape."""
    _check_bias_args("bias_silu", x, bias)


def bias_silu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``silu(x + bias)`` per channel of x (b, C, H, W): the bias and activation of the
    SS2D branches' depthwise convolution, applied to its bias-free output. The bias is
    cast to x's dtype first (as autocast casts a convolution's bias); the result has
    x's dtype and memory format."""
    check_bias_silu_args(x, bias)
    return F.silu(x + bias.to(x.dtype).view(1, -1, 1, 1))


def check_depthwise_conv_silu_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Check the shapes of a :func:`depthwise_conv_silu_ref` call (every backend shares
    this contract); raises ValueError naming the argument, the expected and the given shape."""
    _check_bias_args("depthwise_conv_silu", x, bias)
    C = x.shape[1]
    k = weight.shape[-1] if weight.dim() == 4 else 0
    if weight.shape != (C, 1, k, k) or k % 2 == 0:
        raise ValueError(
            f"depthwise_conv_silu: weight must be ({C}, 1, k, k) with k odd for x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"depthwise_conv_silu: weight is on {weight.device} but x is on {x.device}")


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The SS2D branches' depthwise convolution without its bias: x (b, C, H, W) in any
    layout, made channels-last first; weight (C, 1, k, k), k odd, stride 1, zero padding
    (k - 1) / 2 (the map keeps its size). Channels-last result in the convolution's
    dtype (under autocast, autocast's)."""
    k = weight.shape[-1]
    x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, None, 1, (k - 1) // 2, 1, x.shape[1])


def depthwise_conv_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``silu(conv(x) + bias)``: :func:`depthwise_conv`, then :func:`bias_silu_ref`."""
    check_depthwise_conv_silu_args(x, weight, bias)
    return bias_silu_ref(depthwise_conv(x, weight), bias)


def check_fold_patches_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> None:
    """Check the shapes of a :func:`fold_patches_ref` call (every backend shares this
    contract); raises ValueError naming the argument, the expected and the given shape."""
    if x.dim() != 4:
        raise ValueError(f"fold_patches: x must be (b, h, w, C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"fold_patches: weight must be ({C}, O, p, p) for x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if bias.shape != (weight.shape[1],):
        raise ValueError(f"fold_patches: bias must be ({weight.shape[1]},), got {tuple(bias.shape)}")
    if not 1 <= stride <= weight.shape[2]:
        raise ValueError(f"fold_patches: stride must be 1 .. {weight.shape[2]} (the patch size), got {stride}")
    if weight.device != x.device or bias.device != x.device:
        raise ValueError(f"fold_patches: weight is on {weight.device}, bias on {bias.device}, x on {x.device}")


def fold_patches_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """Overlapping patches summed onto an image: x (b, h, w, C), one patch per token,
    weight (C, O, p, p), bias (O,) -> (b, O, (h - 1) * stride + p, (w - 1) * stride + p),
    ``conv_transpose2d`` of x (made NCHW-contiguous first) with stride ``stride``: output
    pixel (y, x) sums, over the tokens (i, j) whose patch covers it, the products of
    their C channels with the weight at (y - i * stride, x - j * stride), plus the bias
    (the S4Fusion head: expansion, Fold and 1x1 convolution composed). In the
    convolution's dtype (under autocast, autocast's). (NCHW: with a channels-last input,
    torch.compile's shape inference and cuDNN disagree on the strides of the input's
    gradient, torch 2.11.)"""
    check_fold_patches_args(x, weight, bias, stride)
    return F.conv_transpose2d(x.permute(0, 3, 1, 2).contiguous(), weight, bias, stride=stride)


def check_bias_relu_args(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None) -> None:
    """Check the shapes of a :func:`bias_relu_ref` call (every backend shares this
    contract); raises ValueError naming the argument, the expected and the given value."""
    _check_bias_args("bias_relu", x, bias)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"bias_relu: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.device != x.device or residual.dtype != x.dtype:
            raise ValueError(
                f"bias_relu: residual is {residual.dtype} on {residual.device} but x is {x.dtype} on {x.device}"
            )


def bias_relu_ref(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``relu((x + bias) + residual)`` per channel of x (b, C, H, W): a convolution's
    bias and the ReLU after it (with a residual branch, a ResNet bottleneck's end),
    applied to the bias-free convolution's output, summed in this order. The bias is
    cast to x's dtype first; the result has x's dtype and memory format."""
    check_bias_relu_args(x, bias, residual)
    y = x + bias.to(x.dtype).view(1, -1, 1, 1)
    return torch.relu(y if residual is None else y + residual)
