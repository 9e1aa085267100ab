"""End-to-end training on a tiny Market-1501 folder: metrics, resume, DDP, command line."""

import json
import os
import socket

import pytest
import torch

from occreid.cli import main
from occreid.config import load_config
from occreid.engine import trainer as trainer_mod
from occreid.engine.checkpoint import load_checkpoint
from occreid.engine.trainer import Trainer

from helpers import TINY_OVERRIDES, write_market


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_market(root)
    return root


def _cfg(root, out, *extra):
    return load_config(None, TINY_OVERRIDES + [f"data.root={root}", f"output_dir={out}", *extra])


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_train_and_test_from_command_line(market, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--config", "configs/market1501/vit_base.yaml", "--data-root", str(market),
               "--output", str(out), *TINY_OVERRIDES, "solver.max_epochs=12"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for k in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= m[k] <= 1.0
    assert m["dataset"] == "market1501" and m["method"] == "baseline" and m["epoch"] == 12
    # 6 query ids, 3 true matches each among 19 gallery images: chance mAP is about 0.2
    assert m["mAP"] > 0.5 and m["rank1"] > 0.5, m
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"]
    assert (out / "curves.png").is_file() and (out / "last.pth").is_file()

    rc = main(["test", "--weights", str(out / "model_final.pth"), "--data-root", str(market),
               "--output", str(tmp_path / "eval"), "--device", "cpu"])
    assert rc == 0
    m2 = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m2["mAP"] == pytest.approx(m["mAP"], abs=1e-6)
    assert m2["checkpoint"].endswith("model_final.pth")


def test_bad_inputs_on_command_line(market, tmp_path, capsys):
    assert main(["train", "--config", "configs/market1501/vit_base.yaml", "solver.max_epoch=3"]) == 2
    assert "Did you mean 'solver.max_epochs'" in capsys.readouterr().err
    assert main(["train", "--config", "configs/market1501/vit_base.yaml", "--data-root", str(tmp_path / "none"),
                 *TINY_OVERRIDES]) == 2
    assert "none" in capsys.readouterr().err
    assert main(["test", "--weights", str(tmp_path / "missing.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    out = tmp_path / "r"
    assert main(["train", "--config", "configs/market1501/vit_base.yaml", "--data-root", str(market),
                 "--output", str(out), "--resume", *TINY_OVERRIDES]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_reaches_same_weights(market, tmp_path, monkeypatch):
    full = Trainer(_cfg(market, tmp_path / "full", "solver.max_epochs=3"))
    full.train()
    want = _params(full.unwrapped)

    real_save = trainer_mod.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*a, **k):
        real_save(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # killed right after the epoch-2 checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(market, tmp_path / "killed", "solver.max_epochs=3")).train()
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "killed" / "last.pth")["epoch"] == 2

    resumed = Trainer(_cfg(market, tmp_path / "killed", "solver.max_epochs=3"), resume=True)
    assert resumed.start_epoch == 3
    resumed.train()
    got = _params(resumed.unwrapped)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    Trainer(cfg).train()
    torch.distributed.destroy_process_group()


# Deterministic data (no flip/pad/erasing noise) and no drop path: per-sample randomness is drawn
# from each process's own generator, so it cannot match a single process.
DDP_ARGS = ("solver.max_epochs=2", "data.flip_prob=0", "data.padding=0", "data.re_prob=0", "model.drop_path=0")


def test_ddp_two_processes_equal_accumulated_single_process(market, tmp_path):
    """2 gloo processes with a global batch of 16 train the same parameters as one process that
    splits each batch of 16 into the same two shares (solver.accum_steps=2). They differ from a
    plain single process with the whole batch because BatchNorm statistics and batch-hard triplet
    mining are computed per process (per share), exactly as in the official DDP code."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    cfg = _cfg(market, tmp_path / "ddp", *DDP_ARGS)
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, cfg)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    # only rank 0 writes
    ddp = load_checkpoint(tmp_path / "ddp" / "model_final.pth")["model"]
    single = Trainer(_cfg(market, tmp_path / "acc", *DDP_ARGS, "solver.accum_steps=2"))
    single.train()
    ref = _params(single.unwrapped)
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    plain = Trainer(_cfg(market, tmp_path / "plain", *DDP_ARGS))
    plain.train()
    diff = max((plain.unwrapped.state_dict()[k] - ref[k]).abs().max().item() for k in ref)
    assert diff > 1e-4  # the per-process BN/triplet difference is real


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_runs_and_is_finite(market, tmp_path, amp):
    t = Trainer(_cfg(market, tmp_path / amp, "solver.max_epochs=1", f"solver.amp={amp}"))
    assert t.amp == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert t.scaler.is_enabled() == (amp == "fp16")  # fp16 needs the gradient scaler, bf16 does not
    before = _params(t.unwrapped)
    m = t.train()
    after = _params(t.unwrapped)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert 0.0 <= m["mAP"] <= 1.0
