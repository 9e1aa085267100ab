"""DPM's cheap exact second pass (``second_pass="hmg_only"``, the default) against the official
full second pass (``"full"``): the same HMG gradients, the same parameters, BatchNorm statistics
and logged figures after each iteration, bit for bit, and the backbone does not move at the mask
step."""

from __future__ import annotations

import copy

import pytest
import torch

from occreid.config import DEFAULTS
from occreid.engine.step import TrainStep, build_method_optimizers
from occreid.methods import get_method
from occreid.methods.dpm.model import DPM
from occreid.models.backbone import build_backbone

SPEC = get_method("dpm")


def _model(second_pass, seed=0, **bb):
    torch.manual_seed(seed)
    kw = dict(img_size=(32, 16), stride=8, num_cameras=3, drop_path=0.3)
    kw.update(bb)
    m = DPM(build_backbone("vit_nano", **kw), 4, second_pass=second_pass)
    with torch.no_grad():  # a non-zero mask FC, so every HMG layer gets a gradient
        m.hmg.fc.weight.normal_(0, 0.2)
    return m.train()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(8, 3, 32, 16, generator=g),
        "pids": torch.arange(4).repeat_interleave(2),
        "camids": torch.randint(0, 3, (8,), generator=g),
    }


def _run(model, iters=2, seed=123):
    """``iters`` engine steps (the solver's SGD: momentum, weight decay, bias lr); per step the
    stats, the HMG gradients, and the main parameters as they were when the HMG optimiser
    stepped and right after it."""
    solver = dict(DEFAULTS["solver"], base_lr=0.05)
    (opt, hopt), _ = build_method_optimizers(SPEC, model, solver)
    main = {n: p for n, p in model.named_parameters() if not n.startswith("hmg.")}
    at_mask_step = {}
    hopt.register_step_pre_hook(lambda *a: at_mask_step.update({n: p.detach().clone() for n, p in main.items()}))
    step = TrainStep(SPEC, model, [opt, hopt])
    torch.manual_seed(seed)  # same drop-path / dropout draws for both models
    out = []
    for _ in range(iters):
        stats = step(_batch())
        out.append({
            "stats": stats,
            "hmg_grads": {n: p.grad.clone() for n, p in model.hmg.named_parameters()},
            "main_before_mask_step": dict(at_mask_step),
            "main_after": {n: p.detach().clone() for n, p in main.items()},
            "main_grads": {n: p.grad for n, p in main.items()},
        })
    return out


@pytest.mark.parametrize("backbone_kw", [{}, {"drop_rate": 0.2, "attn_drop_rate": 0.2}])
def test_hmg_only_second_pass_equals_the_full_pass_exactly(backbone_kw):
    full = _model("full", **backbone_kw)
    cheap = copy.deepcopy(full)
    cheap.second_pass = "hmg_only"
    assert (full.train_grads(0), full.train_grads(1)) == ("all", "all")
    assert (cheap.train_grads(0), cheap.train_grads(1)) == ("no_hmg", "hmg_only")
    ref, got = _run(full), _run(cheap)
    for r, g in zip(ref, got):
        assert r["stats"] == g["stats"]  # every loss term and the accuracy, as floats
        for n, grad in r["hmg_grads"].items():
            assert torch.equal(grad, g["hmg_grads"][n]), n
            assert grad.abs().sum() > 0, n
        for n, p in r["main_after"].items():
            assert torch.equal(p, g["main_after"][n]), n
            # the mask step moves nothing but the HMG
            assert torch.equal(g["main_before_mask_step"][n], g["main_after"][n]), n
        # the cheap pass computes no backbone gradient (and the first pass's is released)
        assert all(grad is None for n, grad in g["main_grads"].items() if n.startswith("backbone."))
    for (n, a), (_, b) in zip(full.state_dict().items(), cheap.state_dict().items()):
        assert torch.equal(a, b), n  # parameters, HMG BatchNorm and BNNeck running statistics


def test_hmg_without_weight_gradients_gives_the_same_values_and_input_gradient():
    m = _model("hmg_only")
    maps = [torch.randn(2, 32, 4, 2, requires_grad=True) for _ in m.hmg_blocks]
    ref = copy.deepcopy(m.hmg)
    a = ref(maps)
    a.sum().backward()
    grads = [t.grad.clone() for t in maps]
    for t in maps:
        t.grad = None
    b = m.hmg(maps, param_grads=False)
    b.sum().backward()
    assert torch.equal(a, b)
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, maps))
    assert all(p.grad is None for p in m.hmg.parameters())
    for (n, x), (_, y) in zip(ref.state_dict().items(), m.hmg.state_dict().items()):
        assert torch.equal(x, y), n  # BatchNorm running statistics updated as usual


def test_hmg_only_forward_runs_the_backbone_without_autograd():
    m = _model("hmg_only")
    b = _batch()
    out = m(b["images"], b["camids"], grads="hmg_only")
    assert out["global_feat"].grad_fn is None and out["cls_attn"].grad_fn is None
    assert out["mask"].grad_fn is not None and out["cos"].grad_fn is not None
    SPEC.loss(m, out, b)["arc"].backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is not None for p in m.hmg.parameters())
    with pytest.raises(ValueError, match="grads"):
        m(b["images"], b["camids"], grads="backbone")
    with pytest.raises(ValueError, match="second_pass"):
        DPM(build_backbone("vit_nano", img_size=(32, 16), stride=8), 4, second_pass="cheap")


def test_single_pass_and_no_masked_branch_compute_every_gradient():
    for kw in (dict(update_mode="single_pass"), dict(masked_branch=False)):
        torch.manual_seed(0)
        m = DPM(build_backbone("vit_nano", img_size=(32, 16), stride=8), 4, **kw)
        assert {m.train_grads(0), m.train_grads(1)} == {"all"}
