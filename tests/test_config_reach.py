"""Every key a shipped config sets reaches the object that uses it: the method options reach the
built model, the solver keys the optimisers and schedules (built by the same functions the
trainer calls), nothing is silently ignored; inapplicable or ill-typed keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from occreid.config import DEFAULTS, load_config
from occreid.configs import CONFIG_DIR
from occreid.engine.build import build_model, method_options, method_spec, model_meta
from occreid.engine.step import build_method_optimizers
from occreid.methods import SHARED_MODEL_KEYS
from occreid.utils import OccReIDError

SHIPPED = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("_"))


def yaml_chain(path: Path) -> dict:
    """The keys the file (and its _base_ files) set, merged, without the defaults."""
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("_base_", None)
    if base:
        parent = yaml_chain(path.parent / base)
        for k, v in data.items():
            parent[k] = {**parent.get(k, {}), **v} if isinstance(v, dict) and isinstance(parent.get(k), dict) else v
        data = parent
    return data


def option_value(model, key):
    """The value the model uses for method option ``key``."""
    special = {
        "label_smoothing": lambda m: m.id_loss.epsilon,
        "triplet_margin": lambda m: (m.triplet_loss if hasattr(m, "triplet_loss") else m.triplet).margin,
        "hmg_blocks": lambda m: None,  # scaled to the depth; checked below
        "oem": lambda m: m.oem is not None,
        "fdm": lambda m: m.fdm is not None,
        "masked_branch": lambda m: m.hmg is not None,
        "memory_momentum": lambda m: m.memory.momentum,
        "memory_update": lambda m: m.memory.update_rule,
    }
    if key in special:
        return special[key](model)
    assert hasattr(model, key), f"{type(model).__name__} keeps no attribute {key!r}: add an accessor to this test"
    return getattr(model, key)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_key_of_a_shipped_config_reaches_the_model_and_solver(name):
    cfg = load_config(name)
    written = yaml_chain(CONFIG_DIR / name)
    with torch.device("meta"):  # the real ViT-B shapes without allocating or initialising them
        model = build_model(cfg, num_classes=11, num_cameras=8, with_pretrained=False)
    spec = method_spec(cfg)
    m = written.get("model", {})
    opts = spec.options()
    for key in SHARED_MODEL_KEYS:
        if key in m and key in opts:
            assert option_value(model, key) == m[key], (name, key)
    for key, value in (m.get("kwargs") or {}).items():
        got = option_value(model, key)
        if got is not None:
            assert got == (tuple(value) if isinstance(got, tuple) else value), (name, key)
    bb = spec.backbone_of(model)
    if "stride" in m:
        assert tuple(bb.patch_embed.proj.stride) == (m["stride"], m["stride"]), name
    if "sie_camera" in m:
        assert (bb.sie_embed is not None) == bool(m["sie_camera"]), name
    meta = model_meta(cfg, 11, 8, model.feature_dim)
    assert meta["method"] == spec.name and meta["options"] == method_options(cfg)

    s = cfg["solver"]
    optimizers, schedulers = build_method_optimizers(spec, model, s)
    for opt in optimizers:
        assert type(opt).__name__.lower() == s["optimizer"].lower(), name
        for g in opt.param_groups:
            lr = s["base_lr"] * (s["bias_lr_factor"] if g["name"] == "biases" else 1.0)
            assert g["initial_lr" if "initial_lr" in g else "lr"] == pytest.approx(lr), (name, g["name"])
            if s["optimizer"].lower() == "sgd":
                assert g["momentum"] == s["momentum"]
    main = optimizers[0].param_groups
    assert {g["name"]: g["weight_decay"] for g in main} == {
        n: s["weight_decay"] if n == "weights" else s["weight_decay_bias"] for n in (g["name"] for g in main)
    }
    sch = schedulers[0]
    assert (sch.max_epochs, sch.warmup_epochs) == (s["max_epochs"], s["warmup_epochs"])
    assert sch.warmup_lr == pytest.approx(s["warmup_lr_factor"] * s["base_lr"])
    assert sch.min_lr == pytest.approx(s["min_lr_factor"] * s["base_lr"])


def test_dpm_neck_feat_override_reaches_the_model_and_its_metadata():
    """The bug this file exists for: ``model.neck_feat=after`` on a DPM config."""
    cfg = load_config("occluded_duke/dpm.yaml", ["model.neck_feat=after", "model.triplet_margin=0.3"])
    with torch.device("meta"):
        model = build_model(cfg, num_classes=11, num_cameras=8, with_pretrained=False)
    assert model.neck_feat == "after" and model.triplet.margin == 0.3
    assert model_meta(cfg, 11, 8, model.feature_dim)["options"]["neck_feat"] == "after"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.neck_feat=after"], "model.neck_feat='after' does not apply to method 'fed'"),
        (["model.label_smoothing=0.1"], "does not apply to method 'fed'"),
        (["model.kwargs.num_partz=3"], "unknown option model.kwargs.num_partz .*Did you mean 'num_parts'"),
        (["model.kwargs.neck_feat=after"], "set model.neck_feat, not model.kwargs.neck_feat"),
        (["model.kwargs.num_neighbours=eight"], "model.kwargs.num_neighbours='eight' has the wrong type: expected int"),
        (["model.kwargs.oem=1"], "model.kwargs.oem=1 has the wrong type: expected bool"),
    ],
)
def test_inapplicable_unknown_and_ill_typed_method_keys_are_errors(overrides, match):
    cfg = load_config("occluded_duke/fed.yaml", overrides)
    with pytest.raises(OccReIDError, match=match):
        method_options(cfg)


def test_shared_keys_reach_every_method_that_has_them():
    for name in ("occluded_duke/vit_base.yaml", "occluded_duke/dpm.yaml"):
        cfg = load_config(name, ["model.id_loss_weight=0.5", "model.triplet_loss_weight=2"])
        opts = method_options(cfg)
        assert opts["id_loss_weight"] == 0.5 and opts["triplet_loss_weight"] == 2.0
        assert isinstance(opts["triplet_loss_weight"], float)
    assert DEFAULTS["model"]["neck_feat"] == "before"


def test_test_time_overrides_reach_the_rebuilt_model(tmp_path, capsys):
    """``occreid test --weights CKPT model.neck_feat=after`` builds the model from the
    checkpoint's config with the override (it used to rebuild from the stored config alone)."""
    from occreid.cli import main
    from occreid.engine.build import model_from_checkpoint
    from occreid.engine.checkpoint import load_checkpoint

    from helpers import write_market
    from test_inference import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "dpm.pth", "dpm")
    ckpt = load_checkpoint(path)
    with torch.no_grad():  # non-trivial BNNeck statistics, so that before/after differ
        ckpt["model"]["bottleneck.running_mean"].normal_()
    plain = model_from_checkpoint(ckpt)
    after = model_from_checkpoint(ckpt, cfg=load_config(None, ["model.neck_feat=after"], base=ckpt["config"]))
    assert plain.neck_feat == "before" and after.neck_feat == "after"
    x = torch.randn(3, 3, 32, 16)
    with torch.no_grad():
        fb, fa = plain(x)["feat"], after(x)["feat"]
    bn = after.bottleneck
    torch.testing.assert_close(fa, (fb - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)

    # on the command line: an override that does not apply to the checkpoint's method is refused
    write_market(tmp_path / "data")
    fed = make_tiny_checkpoint(tmp_path / "fed.pth", "fed")
    rc = main(["test", "--weights", str(fed), "--data-root", str(tmp_path / "data"), "--output",
               str(tmp_path / "eval"), "--device", "cpu", "model.neck_feat=after"])
    assert rc == 2 and "does not apply to method 'fed'" in capsys.readouterr().err
