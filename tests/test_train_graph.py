"""The training pass replayed as a CUDA graph (``s4fusion.training.step``) against the
same pass run eagerly, and the trainer's use of it. GPU only: skipped without CUDA.

The perception network has random weights here (its values do not matter for
whether a replay equals an eager pass), so these tests need no weights file."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from s4fusion import S4Fusion, S4FusionConfig
from s4fusion.losses import FusionLoss, LossConfig
from s4fusion.ops import set_backend
from s4fusion.perception import PerceptionNet
from s4fusion.training import load_config, train
from s4fusion.training import trainer as trainer_module
from s4fusion.training.step import GRAPH_WARMUP_STEPS, TrainPass
from test_training import REPO, TINY, small_overrides  # the small network on the four tiny pairs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)"),
]

SMALL = S4FusionConfig(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), cmsa_depth=1)
TERMS = trainer_module.TERMS


def random_perception() -> PerceptionNet:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    return PerceptionNet(resnet50(weights=None).state_dict(), "caffe", True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("bf16,tol", [(False, 1e-5), (True, 2e-2)])
def test_replayed_passes_equal_eager_passes(bf16, tol):
    """Two copies of one network, one pass object each: from the third call on the
    graph's replays give the eager pass's outputs, loss terms and gradients on new
    batches (the batch is copied in; the gradients are overwritten, not summed)."""
    set_backend("triton")
    try:
        torch.manual_seed(1)
        eager_model = S4Fusion(SMALL).cuda().train()
        graph_model = copy.deepcopy(eager_model)
        loss_fn = FusionLoss(LossConfig(), perception=random_perception()).cuda()
        passes = {}
        for name, model, graph in (("eager", eager_model, False), ("graph", graph_model, True)):
            opt = torch.optim.AdamW(model.parameters(), fused=True)
            passes[name] = (model, TrainPass(model, loss_fn, TERMS, opt, bf16=bf16, cuda_graph=graph))
        g = torch.Generator(device="cuda").manual_seed(2)
        for call in range(GRAPH_WARMUP_STEPS + 3):
            ir = torch.rand(2, 1, 37, 37, device="cuda", generator=g)
            vi = torch.rand(2, 1, 37, 37, device="cuda", generator=g)
            results = {}
            for name, (model, pass_) in passes.items():
                fused, values = pass_(ir, vi)
                grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
                results[name] = (fused.clone(), values.clone(), grads)
            (fe, ve, ge), (fg, vg, gg) = results["eager"], results["graph"]
            assert rel(fg, fe) < tol and rel(vg, ve) < tol, call
            assert len(gg) == len(ge) > 0
            assert max(rel(a, b) for a, b in zip(gg, ge)) < 10 * tol, call
        assert passes["graph"][1].recorded and not passes["eager"][1].recorded
    finally:
        set_backend(None)


def test_trainer_records_the_step_and_trains_as_eagerly(tmp_path, monkeypatch, capsys):
    """Four steps (two eager, then recorded and replayed) against the same run without
    graphs: the graph run says it recorded at step 3, its first two steps are the eager
    run's, and its replayed steps move the weights as the eager steps do."""
    if not TINY.is_dir():
        pytest.fail(f"reference material missing: {TINY} (the tests need ../shared beside the checkout)")
    perception = random_perception()
    monkeypatch.setattr(trainer_module, "FusionLoss", lambda cfg: FusionLoss(cfg, perception=perception))
    runs = {}
    for graph in (False, True):
        run_dir = tmp_path / f"graph_{graph}"
        overrides = small_overrides(
            run_dir, device='"cuda"', precision='"bf16"', image_every=0, checkpoint_every=2, keep_checkpoints=0,
            cuda_graph=str(graph).lower(), **{"schedule.start_lr": 3e-4, "schedule.ref_lr": 1.5e-3, "schedule.final_lr": 6e-4},
        )  # fmt: skip
        capsys.readouterr()
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        result = train(load_config(None, overrides))
        # training ran with TF32 and cuDNN's benchmark mode and gave the process its settings
        # back (a later fuse in this process would otherwise run TF32 matmuls: test_fuse_cli
        # failed after this test)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark
        said = capsys.readouterr().err
        assert ("step 3: forward, loss and backward recorded as one CUDA graph" in said) == graph
        step2 = torch.load(run_dir / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
        final = load_file(str(result.final_weights))
        losses = [r["loss"] for r in result.history if r["kind"] == "train"]
        runs[graph] = (step2, final, losses)
    (s2_e, fin_e, loss_e), (_, fin_g, loss_g) = runs[False], runs[True]
    assert len(loss_e) == len(loss_g) == 4
    assert loss_g[:2] == pytest.approx(loss_e[:2], rel=1e-3)
    assert loss_g[2:] == pytest.approx(loss_e[2:], rel=2e-2)
    keys = [k for k in fin_e if fin_e[k].is_floating_point()]
    moved = torch.cat([(fin_e[k] - s2_e[k].cpu()).flatten() for k in keys]).norm()
    apart = torch.cat([(fin_g[k] - fin_e[k]).flatten() for k in keys]).norm()
    assert moved > 0 and apart < 0.1 * moved, (float(apart), float(moved))


# `s4fusion train ...` that also saves every process's final weights as RUN_DIR/rank{r}.pt
ENTRY = """
import json, os, sys
import torch
from s4fusion.cli import main
from s4fusion.training import trainer
built = []
build = trainer.build_model
trainer.build_model = lambda config: built.append(build(config)) or built[-1]
code = main(sys.argv[1:])
run_dir = json.loads(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("run_dir=")))
torch.save(built[0].state_dict(), os.path.join(run_dir, "rank%s.pt" % os.environ["RANK"]))
sys.exit(code)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (DDP over NCCL)")
def test_two_processes_record_their_pass_with_ddp_and_train_as_eagerly(tmp_path):
    """torchrun, two GPUs, 14 steps: with cuda_graph every process records forward, loss,
    backward and DDP's all-reduces at step 12 (after 11 eager steps) and replays them. The
    two processes end with bitwise equal weights (the replayed all-reduces averaged their
    gradients), within the spread of eager runs of the run without graphs: two eager DDP
    runs of this test differed by 3.4e-3 of the weights' movement on two H200s (the scan's
    atomic adds sum in any order), a graph run from one of them by 1.5e-4."""
    if not TINY.is_dir():
        pytest.fail(f"reference material missing: {TINY} (the tests need ../shared beside the checkout)")
    from torchvision.models import resnet50

    torch.manual_seed(0)
    resnet = tmp_path / "resnet50_random.pth"
    torch.save(resnet50(weights=None).state_dict(), resnet)
    script = tmp_path / "entry.py"
    script.write_text(ENTRY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    final = {}
    for graph in (False, True):
        run_dir = tmp_path / f"ddp_graph_{graph}"
        overrides = small_overrides(
            run_dir, device='"cuda"', epochs=7, image_every=0, cuda_graph=str(graph).lower(),
            **{"loss.resnet_weights": json.dumps(str(resnet))},
        )  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "train", *overrides]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("step 12: forward, loss and backward recorded as one CUDA graph" in proc.stderr) == graph
        final[graph] = load_file(str(run_dir / "model.safetensors"))
        ranks = [torch.load(run_dir / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    start = trainer_module.build_model(load_config(None, overrides)).state_dict()
    keys = [k for k in final[False] if final[False][k].is_floating_point()]
    moved = torch.cat([(final[False][k] - start[k]).flatten() for k in keys]).norm()
    apart = torch.cat([(final[True][k] - final[False][k]).flatten() for k in keys]).norm()
    assert moved > 0 and apart < 1e-2 * moved, (float(apart), float(moved))
