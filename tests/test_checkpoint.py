import random

import numpy as np
import pytest
import torch
from torch import nn

from occreid.engine.checkpoint import (
    load_checkpoint,
    load_model_state,
    restore_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from occreid.engine.solver import WarmupCosineLR, build_optimizer
from occreid.utils.io import OccReIDError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_roundtrip_restores_everything(tmp_path):
    m = _model()
    opt = build_optimizer(m.named_parameters(), "SGD", base_lr=0.1)
    sch = WarmupCosineLR(opt, max_epochs=10, warmup_epochs=2)
    sch.step(3)
    m(torch.randn(5, 4)).sum().backward()
    opt.step()
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    path = save_checkpoint(tmp_path / "last.pth", m, epoch=3, config={"a": 1}, model_meta={"method": "x"},
                           optimizers=[opt], schedulers=[sch])
    expect = (random.random(), np.random.rand(), torch.rand(1).item())

    m2 = _model()
    with torch.no_grad():
        for p in m2.parameters():
            p.zero_()
    opt2 = build_optimizer(m2.named_parameters(), "SGD", base_lr=0.1)
    sch2 = WarmupCosineLR(opt2, max_epochs=10, warmup_epochs=2)
    ckpt = load_checkpoint(path)
    epoch = restore_training_state(ckpt, m2, [opt2], [sch2])
    assert epoch == 3 and ckpt["config"] == {"a": 1}
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["momentum_buffer"], s2[k]["momentum_buffer"]) for k in s1)
    assert sch2.last_epoch == 3
    got = (random.random(), np.random.rand(), torch.rand(1).item())
    assert got == expect


def test_rng_state_roundtrip():
    random.seed(7); np.random.seed(7); torch.manual_seed(7)
    st = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2).tolist())
    set_rng_state(st)
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == a


def test_atomic_write_leaves_no_temp_files(tmp_path):
    save_checkpoint(tmp_path / "c.pth", _model(), epoch=1, config={}, model_meta={})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_load_errors(tmp_path):
    with pytest.raises(OccReIDError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(OccReIDError, match="cannot read checkpoint"):
        load_checkpoint(junk)
    imnet = tmp_path / "vit.pth"
    torch.save({"pos_embed": torch.zeros(1, 3, 2)}, imnet)
    with pytest.raises(OccReIDError, match="model.pretrained"):
        load_checkpoint(imnet)
    official = tmp_path / "transreid.pth"
    torch.save({"base.cls_token": torch.zeros(1)}, official)
    with pytest.raises(OccReIDError, match="official"):
        load_checkpoint(official)


def test_strict_model_load_reports_keys():
    m = _model()
    state = dict(m.state_dict())
    state.pop("0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(3, 3)
    with pytest.raises(OccReIDError) as ei:
        load_model_state(_model(), state)
    msg = str(ei.value)
    assert "missing keys: 0.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "2.weight (3, 3) vs model (2, 8)" in msg
