"""The method contract: a new method is one spec (here defined inside the test) plus one
registration call, and it trains through the command line with the engine's one step; the
step's accumulation and pass logic against plain references."""

from __future__ import annotations

import copy
import json
from typing import Any, Dict, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from occreid.cli import main
from occreid.engine.checkpoint import load_checkpoint
from occreid.engine.step import TrainStep, build_method_optimizers
from occreid.inference import FeatureExtractor
from occreid.methods import MethodSpec, ParamSet, available_methods, build_model, get_method, register_method, unregister_method
from occreid.utils import OccReIDError

from helpers import TINY_OVERRIDES, write_market


class ToyReID(nn.Module):
    """A ViT with a cosine classifier: the smallest useful method."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, scale: float = 16.0, feat_scale: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(backbone.embed_dim)
        self.head = nn.Linear(self.feature_dim, num_classes, bias=False)
        self.scale = float(scale)
        self.feat_scale = float(feat_scale)

    def forward(self, images, cam_ids=None):
        f = self.backbone(images, cam_ids)[:, 0] * self.feat_scale
        if self.training:
            return {"logits": self.scale * F.linear(F.normalize(f, dim=1), F.normalize(self.head.weight, dim=1))}
        return {"feat": f}

    def loss(self, outputs, pids):
        return {"ce": F.cross_entropy(outputs["logits"], pids)}


class ToySpec(MethodSpec):
    name = "toy"
    model_class = ToyReID
    calls = 0

    def after_step(self, model: nn.Module, outputs: Any, batch: Mapping[str, Any]) -> None:
        type(self).calls += 1


@pytest.fixture()
def toy():
    spec = register_method(ToySpec())
    yield spec
    unregister_method("toy")


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_market(root)
    return root


def test_a_new_method_trains_through_the_cli_and_is_used_for_inference(toy, market, tmp_path, capsys):
    assert "toy" in available_methods()
    out = tmp_path / "run"
    ToySpec.calls = 0
    rc = main(["train", "--config", "configs/market1501/vit_base.yaml", "--data-root", str(market),
               "--output", str(out), *TINY_OVERRIDES, "model.name=toy", "model.kwargs.scale=8",
               "solver.max_epochs=1", "solver.eval_period=1"])
    assert rc == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and "ce" in log[0] and log[0]["iters"] >= 1
    assert ToySpec.calls == log[0]["iters"]  # the spec's hook ran once per iteration
    ckpt = load_checkpoint(out / "model_final.pth")
    assert ckpt["model_meta"]["method"] == "toy" and ckpt["model_meta"]["options"] == {"scale": 8.0}
    assert json.loads((out / "metrics.json").read_text())["method"] == "toy"
    ex = FeatureExtractor(out / "model_final.pth", device="cpu")
    assert ex.model.scale == 8.0 and ex.retrieval == {"distance": "cosine"}
    assert ex(torch.zeros(2, 32, 16, 3, dtype=torch.uint8).numpy()).shape == (2, 32)
    # its options are checked like the shipped methods'
    rc = main(["train", "--config", "configs/market1501/vit_base.yaml", "--data-root", str(market),
               "--output", str(tmp_path / "bad"), *TINY_OVERRIDES, "model.name=toy", "model.kwargs.scal=8"])
    assert rc == 2 and "Did you mean 'scale'" in capsys.readouterr().err


def test_unknown_method_name_is_an_error_with_a_suggestion():
    with pytest.raises(OccReIDError, match="Did you mean 'baseline'"):
        get_method("baselin")
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Again", (MethodSpec,), {"name": "fed", "model_class": ToyReID})())


def _toy_model(seed=0):
    torch.manual_seed(seed)
    return build_model("toy", num_classes=4, backbone="vit_nano", img_size=(32, 16), stride=8, drop_path=0.0)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(8, 3, 32, 16, generator=g), "pids": torch.arange(4).repeat_interleave(2),
            "camids": torch.zeros(8, dtype=torch.long)}


def test_accumulation_equals_one_big_batch_and_plain_sgd(toy):
    """accum_steps=2 over whole-identity shares = the mean of the two shares' losses; both equal
    the plain reference step p - lr * grad. (A spec with an after-step hook, like FED's memory
    update, cannot accumulate: the hook would see only the last share.)"""
    with pytest.raises(OccReIDError, match="accum_steps"):
        TrainStep(toy, _toy_model(), [torch.optim.SGD(_toy_model().parameters(), lr=0.1)], accum_steps=2)
    plain = type("PlainToy", (MethodSpec,), {"name": "toy_plain", "model_class": ToyReID})()
    b = _batch()
    ref = _toy_model()
    p0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    shares = [{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}]
    loss = sum(ref.loss(ref(s["images"]), s["pids"])["ce"] for s in shares) / 2
    grads = torch.autograd.grad(loss, [p for p in ref.parameters()], allow_unused=True)
    lr = 0.1
    m = _toy_model()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    stats = TrainStep(plain, m, [opt], accum_steps=2)(b)
    assert stats["ce"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for (n, p), g in zip(m.named_parameters(), grads):
        expect = p0[n] - lr * g if g is not None else p0[n]
        torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-6, msg=n)


def test_two_passes_step_their_own_optimisers(toy):
    """A spec with two parameter sets and two passes: pass 2 recomputes with pass 1's update."""

    class TwoPass(ToySpec):
        name = "toy2"

        def param_sets(self, model, solver):
            head = [(n, p) for n, p in model.named_parameters() if n.startswith("head.")]
            rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("head.")]
            return [ParamSet("rest", rest), ParamSet("head", head, schedule="constant")]

        def passes(self, model):
            return ((0,), (1,))

    spec = register_method(TwoPass())
    try:
        m = _toy_model()
        solver = {"optimizer": "SGD", "base_lr": 0.1, "bias_lr_factor": 1.0, "weight_decay": 0.0,
                  "weight_decay_bias": 0.0, "momentum": 0.0, "max_epochs": 2, "warmup_epochs": 0,
                  "warmup_lr_factor": 1.0, "min_lr_factor": 0.0}
        opts, scheds = build_method_optimizers(spec, m, solver)
        assert len(opts) == 2 and len(scheds) == 1  # the "constant" set has no schedule
        ref = copy.deepcopy(m)
        b = _batch()
        TrainStep(spec, m, opts)(b)
        # reference: step everything but the head on the loss at theta0, then the head at the update
        loss = ref.loss(ref(b["images"]), b["pids"])["ce"]
        loss.backward()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if not n.startswith("head.") and p.grad is not None:
                    p -= 0.1 * p.grad
        ref.zero_grad()
        ref.loss(ref(b["images"]), b["pids"])["ce"].backward()
        with torch.no_grad():
            ref.head.weight -= 0.1 * ref.head.weight.grad
        for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
        with pytest.raises(OccReIDError, match="accum_steps"):
            TrainStep(spec, m, opts, accum_steps=2)
    finally:
        unregister_method("toy2")


def test_non_finite_loss_stops_the_step(toy):
    m = _toy_model()
    with torch.no_grad():
        m.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite toy loss"):
        TrainStep(toy, m, [torch.optim.SGD(m.parameters(), lr=0.1)])(_batch())


def test_every_shipped_method_returns_a_feat_mapping_in_eval():
    x = torch.randn(2, 3, 32, 16)
    for name in ("baseline", "fed", "dpm"):
        torch.manual_seed(0)
        m = build_model(name, num_classes=4, backbone="vit_nano", img_size=(32, 16), stride=8).eval()
        with torch.no_grad():
            out = m(x)
        spec = get_method(name)
        assert isinstance(out, dict) and out["feat"].shape[0] == 2
        assert list(spec.eval_outputs(m))[0] == "feat" and set(spec.eval_outputs(m)) <= set(out), name
        assert out["feat"].shape[1] == m.feature_dim
