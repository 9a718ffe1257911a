"""The S4Fusion training loop: one process or ``torchrun`` with DistributedDataParallel.

``train(config)`` runs :class:`~s4fusion.training.config.TrainConfig` and returns a
:class:`TrainResult`. What it writes under ``config.run_dir`` (rank 0 only):

* ``config.json``: the resolved configuration; ``splits.json``: every training and
  validation pair (:func:`s4fusion.data.write_splits`);
* ``checkpoints/step_XXXXXXXX.pt`` every ``checkpoint_every`` steps and at the end
  (atomic: temp file + ``os.replace``): the S4Fusion weights (never the ResNet-50 of
  the loss), the AdamW and schedule states, step, epoch and position in the epoch,
  the RNG states of Python, NumPy, torch and CUDA of every process, the config and
  the splits. The data order and crops are functions of ``(seed, epoch, position)``
  (:mod:`s4fusion.data`), so a resumed run continues exactly: on CPU the parameters
  after resuming are bitwise those of an uninterrupted run of the same length;
* ``model.safetensors``: the final network, :meth:`S4Fusion.save_pretrained`;
* ``log.jsonl``: one JSON line per logged step and per validation; ``tb/``:
  TensorBoard scalars (loss terms, lr, gradient norm, throughput, validation)
  and sample images (infrared | visible | fused), if ``tensorboard`` is installed.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1) each process takes
``batch_size / N`` samples of every global batch (the global batches are the same
as on one process), gradients are averaged by DDP (NCCL on CUDA, gloo on CPU),
validation is sharded, and rank 0 alone logs and saves. A non-finite loss stops
every process with :class:`TrainingDivergedError` naming the step and the term.
With ``cuda_graph`` on CUDA, every process records its forward, loss and backward,
DDP's gradient all-reduces included, as a CUDA graph after 11 eager steps (PyTorch's
conditions for recording DDP: the network wrapped on a side stream, NCCL's
asynchronous error handling off, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``, set here
before the process group starts).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .. import checkpoint as ckpt
from ..io import atomic_write, atomic_write_text
from ..data import (
    DataError,
    EpochBatchSampler,
    EvalPairs,
    Pair,
    TrainPairs,
    scan_datasets,
    split_pairs,
    write_splits,
)
from ..losses import FusionLoss
from ..models import S4Fusion
from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig, config_diff, config_from_dict
from .schedule import WarmupCosineSchedule
from .step import DDP_GRAPH_WARMUP_STEPS, GRAPH_WARMUP_STEPS, LaggedValues, TrainPass

__all__ = [
    "train",
    "TrainResult",
    "TrainingDivergedError",
    "build_model",
    "parameter_groups",
    "find_checkpoint",
    "freeze_unused_parameters",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = ckpt.TRAINING_FORMAT
TERMS = ("l1", "ssim", "grad", "per")
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


class TrainingDivergedError(RuntimeError):
    """A loss term became NaN or infinite."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports; ``history`` holds the logged records."""

    run_dir: Path
    step: int
    epoch: int
    last_checkpoint: Optional[Path]
    final_weights: Optional[Path]
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------- helpers
class _Dist:
    """Process-group facts (one process when WORLD_SIZE is unset or 1)."""

    def __init__(self, device_pref: str, graphs: bool) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device = \"cuda\" but CUDA is not available here; use device = \"auto\" or \"cpu\"")
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            if use_cuda:
                if graphs:  # NCCL's async error handling cannot watch collectives inside a CUDA graph
                    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
                dist.init_process_group(backend="nccl", device_id=self.device)
            else:
                dist.init_process_group(backend="gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_sum(t) / self.world if self.world > 1 else t

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes; ``t`` may live on the CPU (NCCL reduces on this process's GPU)."""
        if self.world > 1:
            on_device = t.to(self.device)
            dist.all_reduce(on_device)
            t = on_device.to(t.device)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def build_model(config: TrainConfig) -> S4Fusion:
    """The network at its initialisation for ``config.seed`` (identical on every process)."""
    torch.manual_seed(config.seed)
    return S4Fusion(config.model)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices/kernels; none for biases, 1-D
    parameters (norms, ``Ds``) and parameters marked ``_no_weight_decay`` (``A_logs``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "_no_weight_decay", False) or p.ndim <= 1 or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def freeze_unused_parameters(model: S4Fusion) -> list[str]:
    """Freeze (``requires_grad = False``) the parameters that no output depends on,
    found by one backward pass on a small random pair; returns their names.

    In the released topology these are the finest-scale CMSA and the head's
    unused LayerNorm (facts section 1.3). Freezing them keeps them out of AdamW
    (no weight decay on weights that never get a gradient) and lets DDP run
    without searching for unused parameters at every step."""
    cfg = model.config
    side = cfg.pad_multiple + cfg.pad_offset
    device = next(model.parameters()).device
    x = torch.rand(1, cfg.in_chans, side, side, device=device)
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()  # the probe must not touch BatchNorm statistics (CNN ablation) nor need a batch > 1
    try:
        model(x, x).float().square().mean().backward()
    finally:
        model.train(was_training)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


def find_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest ``checkpoints/step_*.pt`` of a run directory, or None."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return max(found)[1] if found else None


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_objects(obj: Any, d: _Dist) -> list[Any]:
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class _Logger:
    """Rank-0 logging: JSON lines, TensorBoard when available, a progress bar."""

    def __init__(self, run_dir: Path, enabled: bool, progress: bool, total: int, initial: int) -> None:
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.writer = None
        self.bar = None
        self._jsonl = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=initial if initial else None)
        except ImportError as e:
            warnings.warn(
                f"TensorBoard logging is off ({e}); install the 'tensorboard' package to get it. "
                f"Loss terms are still written to {run_dir / 'log.jsonl'}",
                RuntimeWarning,
                stacklevel=2,
            )
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                warnings.warn("tqdm is not installed: progress is printed every log_every steps", RuntimeWarning)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self.history.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{kind}/{k}", v, step)
        if self.bar is None and kind == "train":
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(f"step {step}: {text}", file=sys.stderr, flush=True)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """image (1, H, W) in [0, 1]."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image.clamp(0, 1).float().cpu(), step)

    def advance(self, n: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _triptych(ir: torch.Tensor, vi: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """(1, H, W) images side by side -> (1, H, 3W) for TensorBoard."""
    return torch.cat([ir, vi, fused.clamp(0, 1)], dim=-1).detach().float().cpu()


def _metrics_function(names: list[str]) -> Optional[Callable]:
    """``s4fusion.metrics.evaluate_pair`` if metrics are asked for and that module
    is part of this build (else None, with a warning)."""
    if not names:
        return None
    try:
        from ..metrics import evaluate_pair
    except ImportError as e:
        warnings.warn(f"validation metrics are off: s4fusion.metrics is not available ({e})", RuntimeWarning)
        return None
    return evaluate_pair


# ------------------------------------------------------------------------ data
def _prepare_splits(config: TrainConfig, state: Optional[dict]) -> tuple[dict[str, list[Pair]], str]:
    """``{"train", "held_out", "val"}`` pair lists: scanned (and split) for a new run;
    from the checkpoint when resuming (the validation folders are scanned again if
    they changed: ``val`` = the held-out pairs + those folders)."""
    if state is not None:
        splits = {k: [Pair(**p) for p in v] for k, v in state["splits"].items()}
        missing = [f for p in splits["train"] for f in (p.infrared, p.visible) if not os.path.isfile(f)]
        if missing:
            raise DataError(f"the checkpoint's training pairs are gone, e.g. {missing[:3]}; restore them")
        summary = f"resumed: {len(splits['train'])} training pairs from the checkpoint"
        if config.data.val != state["config"]["data"]["val"]:
            extra, report = _scan_val_folders(config.data.val)
            splits["val"] = splits["held_out"] + extra
            summary += "\nvalidation: " + report if report else ""
        return splits, summary
    report = scan_datasets(config.data.train)
    train, held_out = split_pairs(report.pairs, config.data.val_fraction, config.seed)
    extra, val_report = _scan_val_folders(config.data.val)
    summary = report.summary(config.data.crop, config.data.small)
    if val_report:
        summary += "\nvalidation: " + val_report
    return {"train": train, "held_out": held_out, "val": held_out + extra}, summary


def _scan_val_folders(folders: list[str]) -> tuple[list[Pair], str]:
    if not folders:
        return [], ""
    report = scan_datasets(folders)
    return report.pairs, report.summary()


# ---------------------------------------------------------------------- train
def train(config: TrainConfig, resume: Optional[str] = None) -> TrainResult:
    """Run (or resume) training; see the module docstring. ``resume`` overrides
    ``config.resume`` ("auto" or a checkpoint path)."""
    config.check()
    resume = resume if resume is not None else config.resume
    d = _Dist(config.device, graphs=config.cuda_graph)
    # training turns TF32 on and, in bf16, cuDNN's benchmark mode (below); the caller's
    # process gets its own settings back
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    try:
        return _train(config, resume, d)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
        d.close()


def _load_resume_state(config: TrainConfig, resume: str, run_dir: Path) -> Optional[dict]:
    if not resume:
        existing = find_checkpoint(run_dir)
        if existing is not None:
            raise ConfigError(
                f"run_dir {run_dir} already holds checkpoints (newest {existing.name}); "
                "continue it with --resume auto (or resume=auto), or choose another run_dir"
            )
        return None
    path = find_checkpoint(run_dir) if resume == "auto" else Path(resume)
    if path is None:
        return None  # "auto" with nothing to resume: a new run
    if not path.is_file():
        raise ckpt.CheckpointError(f"checkpoint to resume not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ckpt.CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ckpt.CheckpointError(f"{path} is not an s4fusion training checkpoint ({CHECKPOINT_FORMAT})")
    stored = config_from_dict(state["config"]).to_dict()
    changed = [k for k in config_diff(stored, config.to_dict()) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"cannot resume {path}: these settings differ from the checkpoint's: {', '.join(changed)}; "
            "resume with the same settings (only logging, intervals, max_steps, device, workers and "
            "validation data may change)"
        )
    state["path"] = str(path)
    return state


def load_init_weights(model: torch.nn.Module, source: str) -> None:
    """Copy the tensors of S4Fusion weights into ``model`` (fine-tuning start).

    ``source`` is a file or folder written by ``save_pretrained``, a training
    checkpoint (``.pt``) or the authors' released checkpoint, or ``"bundled"`` for
    the package's weights. Every tensor must match by name and shape (the error names the
    file and the keys); the stored config is not applied, so a run may change the topology
    (both topologies have the same tensors) but not the architecture."""
    if source == "bundled":
        from ..api import default_weights

        path = default_weights()
    else:
        path = Path(source)
    if path.suffix.lower() in ckpt.TORCH_SUFFIXES:
        state, _ = ckpt.load_torch_checkpoint(path)
    else:
        state, _, _ = ckpt.load_weights(path)
    ckpt.check_state_dict(model, state, f"init_weights {path}")
    model.load_state_dict(state, strict=True)


def _train(config: TrainConfig, resume: str, d: _Dist) -> TrainResult:
    run_dir = Path(config.run_dir)
    state = _load_resume_state(config, resume, run_dir)
    splits, data_summary = _prepare_splits(config, state)
    train_pairs, val_pairs = splits["train"], splits["val"]

    sampler = EpochBatchSampler(len(train_pairs), config.batch_size, config.seed, d.rank, d.world)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = config.epochs * steps_per_epoch
    stop_step = min(total_steps, config.max_steps) if config.max_steps else total_steps

    model = build_model(config).to(d.device)
    frozen = freeze_unused_parameters(model)
    loss_fn = FusionLoss(config.loss).to(d.device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.optim.weight_decay),
        lr=config.schedule.start_lr,
        betas=config.optim.betas,
        eps=config.optim.eps,
        fused=d.device.type == "cuda",  # one kernel per step for every tensor (CPU: the for-each form)
    )
    schedule = WarmupCosineSchedule(
        optimizer,
        warmup_steps=round(config.schedule.warmup_epochs * steps_per_epoch),
        start_lr=config.schedule.start_lr,
        ref_lr=config.schedule.ref_lr,
        T_max=total_steps,
        final_lr=config.schedule.final_lr,
    )
    step, epoch, batch_in_epoch = 0, 0, 0
    if state is not None:
        ckpt.check_state_dict(model, state["model"], f"checkpoint {state['path']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        rng = state["rng"]
        _set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
    else:
        if config.init_weights:
            load_init_weights(model, config.init_weights)
        random.seed(config.seed + d.rank)
        np.random.seed(config.seed + d.rank)

    splits_doc = {k: [asdict(p) for p in v] for k, v in splits.items()}
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2))
        if state is None:
            write_splits(
                run_dir / "splits.json",
                train_pairs,
                val_pairs,
                {"seed": config.seed, "val_fraction": config.data.val_fraction, "held_out": splits_doc["held_out"]},
            )
    d.barrier()

    graphed = config.cuda_graph and d.device.type == "cuda"
    net: torch.nn.Module = model
    if d.world > 1:
        # a network whose backward (with DDP's all-reduces) is recorded must be wrapped
        # on a side stream (PyTorch's CUDA-graph notes)
        side = torch.cuda.Stream(d.device) if graphed else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(d.device))
        with torch.cuda.stream(side) if side is not None else nullcontext():
            net = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[d.device.index] if d.device.type == "cuda" else None,
            )
        if side is not None:
            torch.cuda.current_stream(d.device).wait_stream(side)
    use_bf16 = config.precision == "bf16" and d.device.type == "cuda"
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN's heuristics pick slow kernels for some bf16 depthwise convolutions
        # (api.cudnn_autotune); timing the candidates once per shape finds faster ones
        torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark or use_bf16

    dataset = TrainPairs(
        train_pairs, config.data.crop, config.data.flips, config.data.small, config.data.high_bit_depth,
        cache=config.data.cache,
    )  # fmt: skip
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.data.workers,
        pin_memory=d.device.type == "cuda",
        persistent_workers=config.data.workers > 0,
    )
    log = _Logger(run_dir, d.main, config.progress, stop_step, step)
    log.message(data_summary)
    if config.data.cache:
        log.message(f"data.cache: the training pairs decoded in memory, {dataset.cached_bytes / 2**20:.0f} MiB per process")
    train_pass = TrainPass(
        net, loss_fn, TERMS, optimizer, use_bf16, cuda_graph=graphed,
        warmup_steps=DDP_GRAPH_WARMUP_STEPS if d.world > 1 else GRAPH_WARMUP_STEPS,
    )  # fmt: skip
    if frozen:
        count_frozen = sum(p.numel() for n, p in model.named_parameters() if n in frozen)
        log.message(
            f"{len(frozen)} parameter tensors ({count_frozen} values) receive no gradient in the "
            f"{config.model.topology} topology and stay at their initial values: {', '.join(frozen[:3])}, ..."
        )
    log.message(
        f"{len(train_pairs)} training pairs, {len(val_pairs)} validation pairs; {steps_per_epoch} steps per epoch, "
        f"{total_steps} in {config.epochs} epochs"
        + (f", stopping at step {stop_step}" if stop_step < total_steps else "")
        + f"; {d.world} process(es) on {d.device.type}, batch {config.batch_size}"
        + (f" (resumed from {state['path']} at step {step})" if state else "")
    )

    last_ckpt: Optional[Path] = None
    final: Optional[Path] = None
    sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64)
    count, grad_norm = 0, torch.tensor(float("nan"))
    lagged = LaggedValues(len(TERMS) + 1, d.device)

    def take(done: list[tuple[int, torch.Tensor]]) -> None:
        nonlocal count
        for done_step, values in done:
            _check_finite(values, done_step, last_ckpt)
            sums.add_(values)
            count += 1

    t_log = time.perf_counter()
    steps_since_log = 0
    remaining = max(0, stop_step - step)  # 0 when resuming a finished run
    # one pass of the loader through every remaining epoch: its workers prefetch across epoch ends
    sampler.set_epoch(epoch, batch_in_epoch, epochs=max(1, -(-(batch_in_epoch + remaining) // steps_per_epoch)))
    try:
        for ir, vi in loader if remaining else ():
            lr = schedule.step()
            ir = ir.to(d.device, non_blocking=True)
            vi = vi.to(d.device, non_blocking=True)
            net.train()
            recorded = train_pass.recorded
            fused, values = train_pass(ir, vi)
            if train_pass.recorded and not recorded:
                log.message(f"step {step + 1}: forward, loss and backward recorded as one CUDA graph, replayed from now on")
            # the previous step's values are checked while this one runs on the GPU
            take(lagged.push(step + 1, d.all_mean(values)))
            if config.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            steps_since_log += 1
            if batch_in_epoch == steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0

            log_now = step % config.log_every == 0 or step == stop_step
            image_now = config.image_every and step % config.image_every == 0
            val_now = config.val_every and step % config.val_every == 0 and step < stop_step and val_pairs
            checkpoint_now = config.checkpoint_every and step % config.checkpoint_every == 0 and step < stop_step
            if log_now or image_now or val_now or checkpoint_now:
                take(lagged.settle())  # a diverged step stops the run before anything is logged or saved
            if log_now:
                elapsed = time.perf_counter() - t_log
                mean = (sums / count).tolist()
                record = {"loss": mean[0], **{k: v for k, v in zip(TERMS, mean[1:])}, "lr": lr}
                record["steps_per_s"] = steps_since_log / elapsed if elapsed > 0 else float("nan")
                record["images_per_s"] = record["steps_per_s"] * config.batch_size
                if config.optim.grad_clip > 0:
                    record["grad_norm"] = float(grad_norm)
                record["epoch"] = epoch
                log.scalars(step, record)
                postfix = {k: record[k] for k in ("loss", *TERMS, "lr")}
                postfix["img/s"] = record["images_per_s"]
                log.advance(steps_since_log, postfix)
                sums.zero_()
                count, steps_since_log = 0, 0
                t_log = time.perf_counter()
            if image_now:
                log.image("train/ir_vi_fused", _triptych(ir[0], vi[0], fused[0]), step)
            if val_now:
                _validate(model, loss_fn, val_pairs, config, d, log, step, use_bf16)
                t_log = time.perf_counter()
            if checkpoint_now:
                last_ckpt = _save_checkpoint(
                    run_dir, model, optimizer, schedule, step, epoch, batch_in_epoch, config, splits_doc, d
                )
                t_log = time.perf_counter()
            if step >= stop_step:
                break
        if val_pairs:
            _validate(model, loss_fn, val_pairs, config, d, log, step, use_bf16)
        last_ckpt = _save_checkpoint(
            run_dir, model, optimizer, schedule, step, epoch, batch_in_epoch, config, splits_doc, d
        )
        if d.main:
            final = Path(
                model.save_pretrained(run_dir / "model.safetensors", metadata={"step": step, "epoch": epoch})
            )
            log.message(f"finished at step {step}: weights {final}, checkpoint {last_ckpt}")
        d.barrier()
    finally:
        log.close()
    return TrainResult(run_dir, step, epoch, last_ckpt, final, log.history)


def _check_finite(values: torch.Tensor, step: int, last_checkpoint: Optional[Path]) -> None:
    """values = (total, l1, ssim, grad, per); raise naming the first bad term."""
    if bool(torch.isfinite(values).all()):
        return
    names = ("total",) + TERMS
    bad = [(n, float(v)) for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
    first = next(((n, v) for n, v in bad if n != "total"), bad[0])
    hint = f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else ""
    raise TrainingDivergedError(
        f"training stopped at step {step}: loss term '{first[0]}' is {first[1]} "
        f"(non-finite: {', '.join(n for n, _ in bad)}). Lower the learning rate or set optim.grad_clip{hint}"
    )


def _save_checkpoint(
    run_dir: Path,
    model: S4Fusion,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosineSchedule,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    config: TrainConfig,
    splits_doc: dict,
    d: _Dist,
) -> Path:
    rng = _gather_objects(_rng_state(), d)
    path = run_dir / "checkpoints" / f"step_{step:08d}.pt"
    if d.main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "rng": rng,
            "world_size": d.world,
            "config": config.to_dict(),
            "splits": splits_doc,
        }
        _atomic_torch_save(state, path)
        if config.keep_checkpoints:
            found = sorted(
                (int(m.group(1)), p) for p in path.parent.iterdir() if (m := _CKPT_RE.match(p.name))
            )
            for _, old in found[: -config.keep_checkpoints]:
                old.unlink()
    d.barrier()
    return path


@torch.no_grad()
def _validate(
    model: S4Fusion,
    loss_fn: FusionLoss,
    pairs: list[Pair],
    config: TrainConfig,
    d: _Dist,
    log: _Logger,
    step: int,
    use_bf16: bool,
) -> dict[str, float]:
    """Mean loss terms (and fusion metrics when available) over the validation pairs,
    sharded over the processes; images of the first four pairs to TensorBoard."""
    metrics_fn = _metrics_function(config.val_metrics)
    data = EvalPairs(pairs, config.data.val_crop, config.data.high_bit_depth)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i in range(d.rank, len(data), d.world):
        ir, vi, name = data[i]
        ir, vi = ir[None].to(d.device), vi[None].to(d.device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext():
            fused = model(ir, vi)
        fused = fused.float()
        total, terms = loss_fn(fused, ir, vi)
        values = {"loss": float(total), **{k: float(v) for k, v in terms.items()}}
        if metrics_fn is not None:
            values.update(_metric_values(metrics_fn, config.val_metrics, ir, vi, fused, name))
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        if i < 4:
            log.image(f"val/{name}", _triptych(ir[0], vi[0], fused[0]), step)
    keys = sorted(set().union(*_gather_objects(sorted(sums), d)))
    totals = d.all_sum(torch.tensor([[sums.get(k, 0.0), counts.get(k, 0)] for k in keys], dtype=torch.float64))
    means = {k: s / n for k, (s, n) in zip(keys, totals.tolist()) if n > 0}
    log.scalars(step, means, kind="val")
    log.message(f"validation at step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in means.items()))
    model.train(was_training)
    return means


def _metric_values(
    metrics_fn: Callable, names: list[str], ir: torch.Tensor, vi: torch.Tensor, fused: torch.Tensor, name: str
) -> dict[str, float]:
    """Fusion metrics of one pair (tensors (1, 1, H, W) in [0, 1]; the fused image is
    scored as saved: clamped and quantised to 8 bits by the metrics) as ``metric/<name>``."""
    images = [t[0, 0].float().cpu().numpy() for t in (fused.clamp(0, 1), ir, vi)]
    try:
        out = metrics_fn(*images, metrics=names)
    except ValueError as e:  # e.g. a validation crop below the metrics' minimum size
        warnings.warn(f"no fusion metrics for validation pair {name}: {e}", RuntimeWarning)
        return {}
    return {f"metric/{k}": float(v) for k, v in out.items()}
