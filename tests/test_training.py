"""The trainer: configuration (file + strict overrides), the released schedule,
weight-decay groups, a short CPU run on real pairs that lowers the loss, exact
resume, NaN stop, a 2-process torchrun (gloo) run, and the CLI's errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from s4fusion import S4Fusion, S4FusionConfig
from s4fusion.checkpoint import CheckpointError
from s4fusion.cli import main as cli_main
from s4fusion.data import EvalPairs, scan_pairs
from s4fusion.losses import FusionLoss, LossConfig
from s4fusion.models.config import FUSIONS
from s4fusion.perception import load_resnet50
from s4fusion.training import (
    ConfigError,
    TrainConfig,
    TrainingDivergedError,
    WarmupCosineSchedule,
    build_model,
    load_config,
    parameter_groups,
    train,
)
from s4fusion.training import trainer as trainer_module
from s4fusion.training.step import LaggedValues

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY = SHARED / "data" / "tiny"
RESNET = SHARED / "weights" / "resnet50_imagenet_v1.safetensors"


@pytest.fixture(scope="module")
def shared_dir() -> Path:
    if not TINY.is_dir() or not RESNET.is_file():
        pytest.fail(f"reference material missing under {SHARED} (the tests need ../shared beside the checkout)")
    return SHARED


@pytest.fixture(scope="module")
def perception(shared_dir):
    return load_resnet50(RESNET)


@pytest.fixture
def shared_resnet(monkeypatch, perception):
    """The trainer's real FusionLoss, with one ResNet-50 loaded once for the whole file."""
    monkeypatch.setattr(trainer_module, "FusionLoss", lambda cfg: FusionLoss(cfg, perception=perception))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, perception):
    """An uninterrupted 4-step run (2 epochs of 2 steps), a checkpoint every 2 steps, all kept."""
    a_dir = tmp_path_factory.mktemp("train") / "a"
    config = load_config(None, small_overrides(a_dir, checkpoint_every=2, keep_checkpoints=0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "FusionLoss", lambda cfg: FusionLoss(cfg, perception=perception))
        result = train(config)
    return config, result


def small_overrides(run_dir: Path, **extra) -> list[str]:
    """A small network on the four 64x64 tiny pairs: batch 2 -> 2 steps per epoch."""
    values = {
        "run_dir": json.dumps(str(run_dir)),
        "data.train": json.dumps([str(TINY)]),
        "data.crop": "37",  # 37 = 12k+1: no padding inside the network
        "data.workers": "0",
        "batch_size": "2",
        "epochs": "2",
        "device": '"cpu"',
        "precision": '"fp32"',
        "model.dims": "[8, 16, 32]",
        "model.depths": "[1, 1, 1]",
        "model.decoder_depths": "[1, 1, 1]",
        "model.cmsa_depth": "1",
        "loss.resnet_weights": json.dumps(str(RESNET)),
        "schedule.warmup_epochs": "1",
        "schedule.start_lr": "1e-3",
        "schedule.ref_lr": "4e-3",
        "schedule.final_lr": "2e-3",
        "progress": "false",
        "log_every": "1",
        "image_every": "2",
        "val_every": "0",
        "checkpoint_every": "0",
        "val_metrics": "[]",
        "seed": "3",
    }
    values.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def _fixed_loss(model: S4Fusion, perception) -> float:
    """Total loss on the four whole 64x64 tiny pairs (a fixed batch, no augmentation)."""
    data = EvalPairs(scan_pairs(TINY).pairs)
    ir = torch.stack([data[i][0] for i in range(len(data))])
    vi = torch.stack([data[i][1] for i in range(len(data))])
    loss_fn = FusionLoss(LossConfig(resnet_weights=str(RESNET)), perception=perception)
    with torch.no_grad():
        return float(loss_fn(model(ir, vi), ir, vi)[0])


# ----------------------------------------------------------------- config
def test_paper_config_is_the_paper_recipe():
    cfg = load_config(REPO / "configs" / "paper.toml")
    assert (cfg.schedule.start_lr, cfg.schedule.ref_lr, cfg.schedule.final_lr) == (3e-4, 1.5e-3, 6e-4)
    assert (cfg.batch_size, cfg.epochs, cfg.data.crop, cfg.data.flips) == (20, 800, 229, True)
    assert cfg.model.dims == (48, 96, 192) and cfg.model.topology == "released"
    assert cfg.data.train == ["../shared/data/train"] and cfg.data.val == ["../shared/data/val"]
    assert cfg.loss.resnet_weights == "../shared/weights/resnet50_imagenet_v1.safetensors"
    defaults = TrainConfig()
    assert (defaults.batch_size, defaults.epochs, defaults.data.crop) == (20, 800, 229)
    assert (defaults.schedule.start_lr, defaults.schedule.ref_lr, defaults.schedule.final_lr) == (3e-4, 1.5e-3, 6e-4)
    tiny = load_config(REPO / "configs" / "tiny_cpu.toml")
    assert tiny.device == "cpu" and tiny.data.train == ["../shared/data/tiny"]


def test_finetune_config_starts_from_the_bundled_weights():
    """configs/finetune.toml builds exactly the bundled weights' network and loads them."""
    import s4fusion

    cfg = load_config(REPO / "configs" / "finetune.toml")
    assert cfg.init_weights == "bundled" and cfg.schedule.warmup_epochs == 10
    bundled = S4Fusion.from_pretrained(s4fusion.default_weights())
    assert cfg.model == bundled.config
    model = build_model(cfg)
    trainer_module.load_init_weights(model, cfg.init_weights)
    a, b = model.state_dict(), bundled.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_overrides_and_errors_name_the_key(tmp_path):
    cfg = load_config(
        None,
        [
            'data.train=["a", "b"]',
            "optim.betas=[0.8, 0.9]",
            "optim.weight_decay=0",
            "run_dir=runs/x y",
            "loss.resnet_weights=none",
            "data.flips=false",
            "model.dims=[8,16,32]",
        ],
    )
    assert cfg.data.train == ["a", "b"] and cfg.optim.betas == (0.8, 0.9) and cfg.optim.weight_decay == 0.0
    assert cfg.run_dir == "runs/x y" and cfg.loss.resnet_weights is None and cfg.data.flips is False
    assert cfg.model.dims == (8, 16, 32)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*known keys in \[optim\]: betas"):
        load_config(None, ['data.train=["a"]', "optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize'"):
        load_config(None, ['data.train=["a"]', "batchsize=3"])
    with pytest.raises(ConfigError, match=r"batch_size: expected an integer, got 'x'"):
        load_config(None, ['data.train=["a"]', "batch_size=x"])
    with pytest.raises(ConfigError, match=r"optim\.betas: expected 2 values"):
        load_config(None, ['data.train=["a"]', "optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"\[model\].*double"):
        load_config(None, ['data.train=["a"]', "model.dims=[8,10,32]"])
    with pytest.raises(ConfigError, match=r"loss weight w_per"):
        load_config(None, ['data.train=["a"]', "loss.w_per=-1"])
    with pytest.raises(ConfigError, match="data.train is empty"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["max_steps"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ntrain = ["a"]\ncrops = 3\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown config key 'data\.crops'"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[data\n")
    with pytest.raises(ConfigError, match=r"broken\.toml cannot be parsed"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"missing\.toml not found"):
        load_config(tmp_path / "missing.toml")


def test_cli_reports_bad_key_and_bad_dataset_folder(tmp_path, capsys, shared_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ntrain = ["x"]\n')
    assert cli_main(["train", "--config", str(cfg), "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(cfg), "--print-config", "epochs=7"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 7
    nowhere = tmp_path / "no_such_dataset"
    args = small_overrides(tmp_path / "run", **{"data.train": json.dumps([str(nowhere)])})
    assert cli_main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "no_such_dataset does not exist" in err
    novi = tmp_path / "novi"
    (novi / "ir").mkdir(parents=True)
    assert cli_main(["train", *small_overrides(tmp_path / "run", **{"data.train": json.dumps([str(novi)])})]) == 1
    assert "novi has no 'vi' sub-folder" in capsys.readouterr().err


# --------------------------------------------------------------- schedule
def test_schedule_is_the_released_warmup_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=123.0)
    sched = WarmupCosineSchedule(opt, warmup_steps=4, start_lr=3e-4, ref_lr=1.5e-3, T_max=10, final_lr=6e-4)
    assert opt.param_groups[0]["lr"] == 123.0  # set only by step(), as the release
    expected = []
    for s in range(1, 14):
        if s < 4:
            expected.append(3e-4 + s / 4 * (1.5e-3 - 3e-4))
        else:
            q = (s - 4) / 6
            expected.append(max(6e-4, 6e-4 + (1.5e-3 - 6e-4) * 0.5 * (1 + math.cos(math.pi * q))))
    got = [sched.step() for _ in range(13)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[3] == pytest.approx(1.5e-3) and got[9] == pytest.approx(6e-4)  # peak at warm-up end, final at T_max
    assert got[12] > got[9]  # past T_max the cosine rises again (release behaviour)
    assert opt.param_groups[0]["lr"] == got[-1]
    other = WarmupCosineSchedule(opt, 4, 3e-4, 1.5e-3, 10, 6e-4)
    other.load_state_dict(sched.state_dict())
    assert other.step() == sched.step()


def test_weight_decay_groups():
    model = S4Fusion()  # the released size
    groups = parameter_groups(model, 0.05)
    decay = {id(p) for p in groups[0]["params"]}
    names = {n: id(p) in decay for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert len(names) == len(groups[0]["params"]) + len(groups[1]["params"])
    for n, decayed in names.items():
        leaf = n.rsplit(".", 1)[-1]
        if leaf in ("A_logs", "Ds", "bias", "dt_projs_bias") or ".norm." in n or "out_norm" in n:
            assert not decayed, n
        if leaf in ("x_proj_weight", "dt_projs_weight", "mark_proj") or n.endswith("in_proj.weight"):
            assert decayed, n


# ------------------------------------------------------------- training
def test_short_cpu_run_on_real_pairs_lowers_the_loss(run_a, perception):
    config, result = run_a
    a_dir = Path(config.run_dir)
    assert result.step == 4 and result.epoch == 2
    assert sorted(p.name for p in (a_dir / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    records = [json.loads(line) for line in (a_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(set(r) >= {"loss", "l1", "ssim", "grad", "per", "lr", "steps_per_s"} for r in records)
    assert [r["lr"] for r in records] == pytest.approx([2.5e-3, 4e-3, 3e-3, 2e-3])  # warm-up, then cosine
    assert list((a_dir / "tb").iterdir()), "no TensorBoard event file"
    assert json.loads((a_dir / "splits.json").read_text())["train"]
    # the loss on a fixed batch of real pairs (the four whole tiny pairs) went down
    initial = _fixed_loss(build_model(config), perception)
    final_model = S4Fusion.from_pretrained(a_dir / "model.safetensors")
    final = _fixed_loss(final_model, perception)
    print(f"fixed-batch loss: initial {initial:.4f}, after 4 steps {final:.4f}")
    assert final < 0.95 * initial, (initial, final)
    # the checkpoint holds everything needed to resume, and no ResNet-50
    state = torch.load(a_dir / "checkpoints" / "step_00000004.pt", weights_only=True)
    needed = {"model", "optimizer", "schedule", "step", "epoch", "batch_in_epoch", "rng", "config", "splits"}
    assert needed <= set(state)
    assert set(state["model"]) == set(final_model.state_dict())
    assert not [k for k in load_file(str(a_dir / "model.safetensors")) if "perception" in k or "resnet" in k]


def test_stop_and_resume_equals_the_uninterrupted_run(run_a, tmp_path, shared_resnet):
    config_a, _ = run_a
    a_dir = Path(config_a.run_dir)
    b_dir = tmp_path / "b"
    train(load_config(None, small_overrides(b_dir, max_steps=3)))  # stops in the middle of epoch 2
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(load_config(None, small_overrides(b_dir)))
    with pytest.raises(ConfigError, match=r"differ from the checkpoint's: batch_size"):
        train(load_config(None, small_overrides(b_dir, batch_size=4)), resume="auto")
    # resumed with two loader processes: the samples do not depend on the workers
    resumed = train(load_config(None, small_overrides(b_dir, **{"data.workers": 2})), resume="auto")
    assert resumed.step == 4
    wa, wb = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
    sa = torch.load(a_dir / "checkpoints" / "step_00000004.pt", weights_only=True)
    sb = torch.load(b_dir / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert sa["schedule"] == sb["schedule"]
    assert (sa["epoch"], sa["batch_in_epoch"]) == (sb["epoch"], sb["batch_in_epoch"])
    for i in sa["optimizer"]["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["optimizer"]["state"][i][key], sb["optimizer"]["state"][i][key])


def test_init_weights_starts_from_given_weights(run_a, tmp_path, shared_resnet):
    """A fine-tuning start: with every learning rate 0 one step leaves exactly the given
    weights (also after a topology switch); a random start does not; a file of another
    architecture is refused naming the file and a key."""
    config_a, _ = run_a
    init = Path(config_a.run_dir) / "model.safetensors"
    zero_lr = {"schedule.start_lr": 0, "schedule.ref_lr": 0, "schedule.final_lr": 0, "max_steps": 1}
    tuned = train(
        load_config(
            None,
            small_overrides(
                tmp_path / "ft", init_weights=json.dumps(str(init)), **{"model.topology": '"paper"'}, **zero_lr
            ),
        )
    )
    w0, w1 = load_file(str(init)), load_file(str(tuned.final_weights))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    fresh = load_file(str(train(load_config(None, small_overrides(tmp_path / "rnd", **zero_lr))).final_weights))
    assert not all(torch.equal(w0[k], fresh[k]) for k in w0)
    wide = small_overrides(tmp_path / "wide", init_weights=json.dumps(str(init)), **{"model.dims": "[12, 24, 48]"})
    with pytest.raises(CheckpointError, match=r"init_weights .*model\.safetensors.*embed"):
        train(load_config(None, wide))


def test_training_checkpoints_load_with_their_config(tmp_path, shared_resnet):
    """A checkpoint of a paper-topology run fuses as that network (not the released
    default), is refused as an authors' release, and can start another run."""
    import s4fusion

    run = train(load_config(None, small_overrides(tmp_path / "p", max_steps=1, **{"model.topology": '"paper"'})))
    ckpt_path = run.last_checkpoint
    assert ckpt_path is not None and ckpt_path.suffix == ".pt"
    model = s4fusion.api.load_model(ckpt_path, device="cpu")
    final = S4Fusion.from_pretrained(run.final_weights)
    assert model.config == final.config and model.config.topology == "paper" and model.config.dims == (8, 16, 32)
    a, b = model.state_dict(), final.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match=r"step_00000001\.pt is an s4fusion training checkpoint"):
        S4Fusion.from_released_checkpoint(ckpt_path)
    zero_lr = {"schedule.start_lr": 0, "schedule.ref_lr": 0, "schedule.final_lr": 0, "max_steps": 1}
    again = train(load_config(None, small_overrides(tmp_path / "q", init_weights=json.dumps(str(ckpt_path)), **zero_lr)))
    c = load_file(str(again.final_weights))
    assert all(torch.equal(a[k], c[k]) for k in a)


def _loss_spoiled_at_second_step(perception, term: str, factor: float, into_total: bool, calls: dict):
    """A FusionLoss factory whose ``term`` is multiplied by ``factor`` at the second call
    (calls counted in ``calls["n"]``), added to the total too with ``into_total``."""

    class SpoiledAtSecondStep(FusionLoss):
        def forward(self, fused, infrared, visible):
            total, terms = super().forward(fused, infrared, visible)
            calls["n"] += 1
            if calls["n"] == 2:
                terms[term] = terms[term] * factor
                if into_total:
                    total = total + terms[term]
            return total, terms

    return lambda cfg: SpoiledAtSecondStep(cfg, perception=perception)


def test_non_finite_loss_stops_naming_step_and_term(tmp_path, monkeypatch, perception):
    spoiled = _loss_spoiled_at_second_step(perception, "ssim", float("nan"), True, {"n": 0})
    monkeypatch.setattr(trainer_module, "FusionLoss", spoiled)
    # also: without the tensorboard package the run goes on with a warning
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run_dir = tmp_path / "nan"
    with pytest.warns(RuntimeWarning, match="TensorBoard logging is off"):
        with pytest.raises(TrainingDivergedError, match=r"step 2: loss term 'ssim' is nan"):
            train(load_config(None, small_overrides(run_dir)))
    assert not (run_dir / "tb").exists()
    assert (run_dir / "log.jsonl").read_text().count('"kind": "train"') == 1


def test_a_lagged_check_still_stops_at_the_diverged_step_before_logging_it(tmp_path, monkeypatch, perception):
    """Values are checked one step late (LaggedValues) but always before a log, image or
    checkpoint: with log_every 4 a NaN at step 2 stops the run at step 3's check, naming step 2,
    with no record logged."""
    calls = {"n": 0}
    monkeypatch.setattr(
        trainer_module, "FusionLoss", _loss_spoiled_at_second_step(perception, "l1", float("inf"), False, calls)
    )
    run_dir = tmp_path / "lagged"
    with pytest.raises(TrainingDivergedError, match=r"step 2: loss term 'l1' is inf"):
        train(load_config(None, small_overrides(run_dir, log_every=4, image_every=0, epochs=3)))
    assert calls["n"] == 3  # step 3 ran before step 2's values were read
    assert '"kind": "train"' not in (run_dir / "log.jsonl").read_text()


def test_lagged_values_return_each_step_once_in_order():
    lagged = LaggedValues(3, torch.device("cpu"))
    assert lagged.settle() == []
    assert lagged.push(1, torch.tensor([1.0, 2.0, 3.0])) == []
    source = torch.tensor([4.0, 5.0, 6.0])
    done = lagged.push(2, source)
    assert [s for s, _ in done] == [1] and done[0][1].tolist() == [1.0, 2.0, 3.0]
    source.fill_(0)  # copied at push: a graph's output buffer may be overwritten afterwards
    lagged.push(3, torch.tensor([7.0, 8.0, 9.0]))  # overwrites the buffer that held step 1
    assert done[0][1].tolist() == [1.0, 2.0, 3.0]  # returned values are the caller's own
    last = lagged.settle()
    assert [s for s, _ in last] == [3] and last[0][1].dtype == torch.float64
    assert lagged.settle() == []


def test_cached_pairs_train_as_read_pairs(run_a, tmp_path, shared_resnet, capsys):
    """data.cache (decoded once, shared by two loader processes) trains exactly as run_a,
    which decodes every sample in the main process."""
    config_a, _ = run_a
    res = train(load_config(None, small_overrides(tmp_path / "cached", **{"data.cache": "true", "data.workers": 2})))
    assert "data.cache: the training pairs decoded in memory" in capsys.readouterr().err
    wa = load_file(str(Path(config_a.run_dir) / "model.safetensors"))
    wc = load_file(str(res.final_weights))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_the_loader_runs_one_pass_through_all_epochs(tmp_path, monkeypatch, shared_resnet):
    """The workers prefetch across epoch ends: one iterator for a 3-epoch run, and a run
    stopped and resumed sees the same batches as the whole run
    (test_stop_and_resume_equals_the_uninterrupted_run)."""
    iters = []
    original = trainer_module.EpochBatchSampler.__iter__

    def counted(self):
        iters.append((self.epoch, self.start_batch, self.epochs))
        return original(self)

    monkeypatch.setattr(trainer_module.EpochBatchSampler, "__iter__", counted)
    res = train(load_config(None, small_overrides(tmp_path / "one_pass", epochs=3, image_every=0)))
    assert res.step == 6 and iters == [(0, 0, 3)]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_gradient_has_its_parameters_strides(fusion):
    """DDP's gradient-layout contract: a gradient laid out unlike its parameter makes
    DDP warn ("Grad strides do not match bucket view strides") and copy it into its
    bucket at every step. The channels-last convolutions keep channels-last weights."""
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig(fusion=fusion)).train()
    ir, vi = torch.rand(2, 1, 37, 37), torch.rand(2, 1, 37, 37)
    model(ir, vi).abs().mean().backward()
    grads = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert grads and [n for n, p in grads if p.grad.stride() != p.stride()] == []


def test_torchrun_two_processes_on_cpu(run_a, tmp_path):
    script = tmp_path / "entry.py"
    script.write_text("import sys\nfrom s4fusion.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    run_dir = tmp_path / "ddp"
    overrides = small_overrides(run_dir, max_steps=2, **{"data.val": json.dumps([str(TINY)])})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), "train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = list((run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_00000002.pt"]
    state = torch.load(ckpts[0], weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 2
    kinds = [json.loads(x)["kind"] for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert kinds == ["train", "train", "val"]  # rank 0 alone logs
    # each process took one sample of every global batch of two and DDP averaged the
    # gradients: losses and parameters follow the one-process run of the same steps
    config_a, _ = run_a
    a_dir = Path(config_a.run_dir)
    losses_a = [json.loads(x)["loss"] for x in (a_dir / "log.jsonl").read_text().splitlines()][:2]
    losses_ddp = [json.loads(x)["loss"] for x in (run_dir / "log.jsonl").read_text().splitlines()][:2]
    assert losses_ddp == pytest.approx(losses_a, rel=1e-5)
    single = torch.load(a_dir / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
    ddp = S4Fusion.from_pretrained(run_dir / "model.safetensors").state_dict()
    init = build_model(config_a).state_dict()
    moved = torch.cat([(single[k] - init[k]).abs().flatten() for k in single])
    diff = torch.cat([(single[k] - ddp[k]).abs().flatten() for k in single])
    print(f"two steps moved the parameters by {moved.mean():.3g} on average; DDP vs one process: {diff.mean():.3g}")
    assert float(moved.mean()) > 1e-3 and float(diff.mean()) < 1e-4 * float(moved.mean())


def test_a_training_pass_that_cannot_be_recorded_says_how_to_train_without_graphs():
    """TrainPass: the calls before the recording run eagerly (the optimizer's gradients
    are set), and a recording that fails names the cause and the cuda_graph switch."""
    from s4fusion.training.step import GRAPH_WARMUP_STEPS, TrainPass

    small = S4FusionConfig(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1, topology="paper")
    model = S4Fusion(small)  # paper topology: every parameter gets a gradient
    opt = torch.optim.AdamW(model.parameters())

    def loss_fn(fused, ir, vi):
        terms = {"l1": (fused - ir).abs().mean(), "ssim": (fused - vi).abs().mean()}
        return terms["l1"] + terms["ssim"], terms

    pass_ = TrainPass(model, loss_fn, ("l1", "ssim"), opt, bf16=False, cuda_graph=True)
    ir, vi = torch.rand(1, 1, 37, 37), torch.rand(1, 1, 37, 37)
    for _ in range(GRAPH_WARMUP_STEPS):
        fused, values = pass_(ir, vi)
        assert fused.shape == ir.shape and not fused.requires_grad and values.shape == (3,)
        assert values[0] == pytest.approx(float(values[1] + values[2]))
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(RuntimeError, match=r"CUDA graph failed \(ValueError: CUDA graphs need CUDA tensors.*cuda_graph = false"):
        pass_(ir, vi)
    assert not pass_.recorded
