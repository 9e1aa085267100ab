import math

import pytest
import torch
from torch import nn

from occreid.engine.solver import WarmupCosineLR, build_optimizer, make_param_groups

# transreid-backbone.md §4.2: weight-group learning rate at each (1-based) epoch
OFFICIAL_LR = {1: 1.664e-3, 2: 3.248e-3, 3: 4.832e-3, 4: 6.416e-3, 5: 7.966e-3, 6: 7.951e-3,
               30: 6.831e-3, 60: 4.008e-3, 90: 1.185e-3, 119: 1.74e-5, 120: 1.6e-5}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.bn.bias.requires_grad_(False)


def test_param_groups_bias_factor_and_frozen_skipped():
    m = Tiny()
    groups = make_param_groups(m.named_parameters(), 0.008, 1e-4, 2.0, 1e-4)
    by = {g["name"]: g for g in groups}
    assert by["weights"]["lr"] == 0.008 and by["biases"]["lr"] == 0.016
    ids = lambda ps: {id(p) for p in ps}
    assert ids(by["weights"]["params"]) == {id(m.fc.weight), id(m.bn.weight)}
    assert ids(by["biases"]["params"]) == {id(m.fc.bias)}  # frozen BN bias excluded


def test_schedule_matches_official_table():
    opt = build_optimizer(Tiny().named_parameters(), "SGD", base_lr=0.008)
    sch = WarmupCosineLR(opt, max_epochs=120, warmup_epochs=5, warmup_lr=0.01 * 0.008, min_lr=0.002 * 0.008)
    for epoch, want in OFFICIAL_LR.items():
        sch.step(epoch)
        got = opt.param_groups[0]["lr"]
        assert got == pytest.approx(want, rel=2e-3), epoch
    # bias group: twice the lr in the plateau, same floor and warm-up start
    sch.step(30)
    wl, bl = (g["lr"] for g in opt.param_groups)
    assert bl == pytest.approx(1.6e-5 + 0.5 * (0.016 - 1.6e-5) * (1 + math.cos(math.pi * 30 / 120)))
    sch.step(120)
    assert opt.param_groups[1]["lr"] == pytest.approx(1.6e-5)


def test_scheduler_state_roundtrip():
    opt = build_optimizer(Tiny().named_parameters(), "SGD", base_lr=0.1)
    sch = WarmupCosineLR(opt, max_epochs=10, warmup_epochs=2)
    sch.step(4)
    state = sch.state_dict()
    sch2 = WarmupCosineLR(build_optimizer(Tiny().named_parameters(), "SGD", base_lr=0.1), max_epochs=99)
    sch2.load_state_dict(state)
    assert sch2.max_epochs == 10 and sch2.last_epoch == 4


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(Tiny().named_parameters(), "lamb")


def test_sgd_is_fused_and_matches_the_per_tensor_loop_bit_for_bit():
    """The fused SGD kernel on the CPU gives exactly the updates of torch's per-tensor loop
    (weight decay, momentum, bias learning rate), step after step."""
    torch.manual_seed(0)
    shapes = [(64, 48), (48,), (7, 3, 4, 4)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    out = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        named = [("w", params[0]), ("b.bias", params[1]), ("conv", params[2])]
        if fused:
            opt = build_optimizer(named, "SGD", base_lr=0.05, weight_decay=1e-3, weight_decay_bias=1e-4)
            assert all(g["fused"] for g in opt.param_groups)
        else:
            opt = torch.optim.SGD(make_param_groups(named, 0.05, 1e-3, 2.0, 1e-4), lr=0.05, momentum=0.9, foreach=False)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        out.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_per_iteration_schedule_is_smooth_warmup_then_shifted_cosine():
    opt = build_optimizer(Tiny().named_parameters(), "SGD", base_lr=0.1)
    sch = WarmupCosineLR(opt, max_epochs=10, warmup_epochs=2, warmup_lr=0.004, min_lr=0.0002, per_iteration=True)
    w_lr = lambda: opt.param_groups[0]["lr"]  # noqa: E731
    base = opt.param_groups[0]["initial_lr"]
    sch.step(1, 0.0)
    assert w_lr() == pytest.approx(0.004)  # the first batch of the run: warmup_lr
    sch.step(1, 0.5)
    assert w_lr() == pytest.approx(0.004 + 0.5 * (base - 0.004) / 2)  # half an epoch into a 2-epoch warm-up
    sch.step(3, 0.0)
    assert w_lr() == pytest.approx(base)  # warm-up done: the cosine starts at the base lr
    sch.step(6, 0.25)  # t = 5.25 epochs: (5.25 - 2) / 8 of the cosine
    want = 0.0002 + 0.5 * (base - 0.0002) * (1 + math.cos(math.pi * 3.25 / 8))
    assert w_lr() == pytest.approx(want)
    # monotone: up during the warm-up, down afterwards, never below min_lr
    lrs = []
    for e in range(1, 11):
        for i in range(4):
            sch.step(e, i / 4)
            lrs.append(w_lr())
    assert all(a < b for a, b in zip(lrs[:8], lrs[1:9]))
    assert all(a >= b for a, b in zip(lrs[8:], lrs[9:])) and min(lrs) >= 0.0002
    assert sch.state_dict()["per_iteration"] is True
    # the per-epoch form ignores progress
    sch_e = WarmupCosineLR(opt, max_epochs=10, warmup_epochs=2, warmup_lr=0.004, min_lr=0.0002)
    sch_e.step(1, 0.9)
    assert w_lr() == pytest.approx(0.004 + (base - 0.004) / 2)


def test_lr_schedule_config_key_is_validated():
    from occreid.config import load_config
    from occreid.utils import OccReIDError

    assert load_config(None, ["solver.lr_schedule=iteration"])["solver"]["lr_schedule"] == "iteration"
    with pytest.raises(OccReIDError, match="lr_schedule"):
        load_config(None, ["solver.lr_schedule=batch"])
