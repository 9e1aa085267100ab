"""Bad input on the command line: every mistake ends in one ``occreid: error: ...`` line on stderr
and exit status 2, before any expensive work, and destroys nothing.

``CASES`` is the bad-input suite counted in docs/usage.md ("Troubleshooting"). Each case runs the
CLI in-process (``occreid.cli.main``) on tiny data: a Market-style folder, a one-epoch vit_nano
run, a gallery index and a tiny SynthOcc, all made once per module. The tests after the suite
check the behaviour that replaced silent damage: ``--overwrite``, a fresh ``log.jsonl``,
unreadable images skipped by ``occreid index``, index paths that survive moving, file modes,
intermixed overrides, help texts and ``kill -9`` + ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
from PIL import Image

from occreid.cli import build_parser, main

from helpers import TINY_OVERRIDES, write_market
from test_inference import make_tiny_checkpoint

MARKET_CFG = "configs/market1501/vit_base.yaml"
REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: Sequence[str]) -> int:
    """``occreid ARGV`` in this process; argparse's exit becomes a return code."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # usage errors
        return int(exc.code or 0)


def snapshot(*paths: Path) -> Dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), keyed by path."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------
# Shared tiny world (made once)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from occreid.data.synthetic import generate_synthocc
    from occreid.engine.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("bad_input")
    w = SimpleNamespace(root=root)
    w.data = root / "data"
    write_market(w.data)
    # a finished one-epoch run; the overrides stand before and after the options (intermixed)
    w.run = root / "run"
    assert run_cli(["train", "--config", MARKET_CFG, *TINY_OVERRIDES[:5], "--data-root", w.data,
                    "--output", w.run, *TINY_OVERRIDES[5:], "solver.max_epochs=1"]) == 0
    w.ckpt = w.run / "model_final.pth"
    # a partial run: checkpoint and log of epoch 1, no model_final.pth
    w.partial = root / "partial"
    w.partial.mkdir()
    for name in ("last.pth", "log.jsonl", "config.yaml"):
        shutil.copy2(w.run / name, w.partial / name)
    w.other_ckpt = make_tiny_checkpoint(root / "other.pth", "baseline", seed=1)
    # a gallery of Market-style images and its index
    w.gallery = root / "gallery"
    shutil.copytree(w.data / "market1501" / "bounding_box_test", w.gallery)
    w.index = root / "g.idx"
    assert run_cli(["index", "--weights", w.ckpt, "--images", w.gallery, "--out", w.index, "--device", "cpu"]) == 0
    w.query = sorted(w.gallery.glob("*.jpg"))[0]
    # broken files of every kind
    b = root / "broken"
    b.mkdir()
    (b / "empty.pth").write_bytes(b"")
    (b / "text.pth").write_text("hello, I am not a checkpoint\n")
    with open(b / "foreign.pth", "wb") as fh:
        pickle.dump({"model": SimpleNamespace(weights=[1, 2, 3])}, fh)
    (b / "truncated.pth").write_bytes(w.ckpt.read_bytes()[:4096])
    torch.save({"weight": torch.ones(3)}, b / "plain.pth")
    torch.save({"pos_embed": torch.zeros(1, 5, 8), "cls_token": torch.zeros(1, 1, 8)}, b / "imagenet.pth")
    (b / "fake.jpg").write_text("not an image")
    (b / "zero.jpg").write_bytes(b"")
    good = w.query.read_bytes()
    (b / "cut.jpg").write_bytes(good[: len(good) // 3])
    (b / "list.yaml").write_text("- a\n- b\n")
    (b / "syntax.yaml").write_text("solver:\n  max_epochs: [1, 2\n")
    (b / "a_file").write_text("a file where a folder is expected")
    w.broken = b
    # gallery folders with unreadable images
    w.gallery_bad = root / "gallery_bad"
    shutil.copytree(w.gallery, w.gallery_bad)
    (w.gallery_bad / "0100_c9s1_000100_00.jpg").write_bytes(good[: len(good) // 3])
    w.gallery_unreadable = root / "gallery_unreadable"
    w.gallery_unreadable.mkdir()
    for k in range(2):
        (w.gallery_unreadable / f"{k}.jpg").write_text("garbage")
    (root / "empty_folder").mkdir()
    # a tiny SynthOcc (preset tiny, seed 0) and a checkpoint whose config asks for it
    w.synth = root / "synth"
    generate_synthocc(w.synth / "SynthOcc", "tiny", seed=0)
    ck = load_checkpoint(w.ckpt)
    ck["config"]["data"].update(name="synthocc", synth_preset="tiny", synth_seed=0, root=str(w.synth))
    w.synth_ckpt = root / "synth_model.pth"
    torch.save(ck, w.synth_ckpt)
    return w


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One mistake: the command line, a fragment of the expected message, and what must survive."""

    name: str
    argv: Callable[[SimpleNamespace], List]
    expect: str
    keep: Callable[[SimpleNamespace], List[Path]] = lambda w: []  # files/folders that must stay byte-identical
    absent: Callable[[SimpleNamespace], List[Path]] = lambda w: []  # paths that must not be created
    setup: Optional[Callable] = None  # (monkeypatch, world) -> None
    before_model: bool = False  # must fail before any model is loaded


def _train(w, out, *extra):
    return ["train", "--config", MARKET_CFG, "--data-root", w.data, "--output", out, *TINY_OVERRIDES, *extra]


def _tr(w, *extra):
    return _train(w, w.root / "new_run", *extra)


def _no_module(name):
    def setup(monkeypatch, w):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError

    return setup


def _ts(w, *extra):
    return ["test", "--weights", w.ckpt, "--data-root", w.data, "--output", w.root / "eval", "--device", "cpu", *extra]


def _search(w, *extra, index=None):
    return ["search", "--index", index or w.index, "--device", "cpu", *extra]


CASES = [
    # ---------------------------------------------------------------- configs
    Case("misspelt config key", lambda w: _tr(w, "solver.max_epoch=3"), "Did you mean 'solver.max_epochs'"),
    Case("misspelt config section", lambda w: _tr(w, "solverr.max_epochs=3"), "Did you mean 'solver'"),
    Case("non-numeric integer", lambda w: _tr(w, "solver.max_epochs=abc"),
         "'solver.max_epochs' in override 'solver.max_epochs=abc' must be an integer"),
    Case("fractional integer", lambda w: _tr(w, "solver.max_epochs=1.5"), "must be an integer (default: 120), got 1.5"),
    Case("non-numeric float", lambda w: _tr(w, "solver.base_lr=fast"), "'solver.base_lr' in override 'solver.base_lr=fast' must be a number"),
    Case("non-boolean flag", lambda w: _tr(w, "model.sie_camera=maybe"), "'model.sie_camera'" " in override 'model.sie_camera=maybe' must be true or false"),
    Case("list key given text", lambda w: _tr(w, "data.size_train=big"), "'data.size_train' in override 'data.size_train=big' must be a list"),
    Case("value not among the choices", lambda w: _tr(w, "solver.amp=fp8"), "solver.amp='fp8' is not one of auto, bf16, fp16, fp32"),
    Case("override without =", lambda w: _tr(w, "solver.max_epochs"), "must look like section.key=value"),
    Case("section given a value", lambda w: _tr(w, "solver=3"), "'solver' in override 'solver=3' must be a mapping"),
    Case("batch not a multiple of the instances", lambda w: _tr(w, "solver.ims_per_batch=10"), "must be a multiple of data.num_instances=4"),
    Case("config file missing", lambda w: ["train", "--config", w.root / "nope.yaml"], "not found (not a file, nor a shipped config"),
    Case("config YAML syntax error", lambda w: ["train", "--config", w.broken / "syntax.yaml"], "cannot parse YAML config"),
    Case("config not a mapping", lambda w: ["train", "--config", w.broken / "list.yaml"], "must be a mapping at top level"),
    # ---------------------------------------------------------------- datasets
    Case("train: dataset folder missing", lambda w: ["train", "--config", MARKET_CFG, "--data-root", w.root / "no_data", "--output",
                                                       w.root / "new_run", *TINY_OVERRIDES], "no_data"),
    Case("test: --data-root missing for a real dataset", lambda w: ["test", "--weights", w.ckpt, "--data-root", w.root / "no_data", "--device", "cpu"],
         "no_data", absent=lambda w: [w.root / "no_data"]),
    Case("test: SynthOcc folder missing (never generated)",
         lambda w: ["test", "--weights", w.synth_ckpt, "--data-root", w.root / "typo", "--device", "cpu"],
         "no SynthOcc dataset in", absent=lambda w: [w.root / "typo"]),
    Case("visualize: SynthOcc folder missing (never generated)",
         lambda w: ["visualize", "--weights", w.synth_ckpt, "--data-root", w.root / "typo2", "--out", w.root / "viz",
                    "--device", "cpu"],
         "pass --generate-data", absent=lambda w: [w.root / "typo2"]),
    Case("train: SynthOcc of another preset",
         lambda w: ["train", "--config", "synthocc/baseline_demo.yaml", "--data-root", w.synth, "--output",
                    w.root / "synth_run", "device=cpu", "data.synth_preset=demo"],
         "holds SynthOcc preset 'tiny' seed 0, but the config asks for preset 'demo' seed 0",
         keep=lambda w: [w.synth]),
    Case("test: SynthOcc of another seed",
         lambda w: ["test", "--weights", w.synth_ckpt, "--device", "cpu", "--output", w.root / "eval", "data.synth_seed=3"],
         "asks for preset 'tiny' seed 3", keep=lambda w: [w.synth]),
    Case("synth: folder holds another seed", lambda w: ["synth", "--out", w.synth / "SynthOcc", "--preset", "tiny", "--seed", "1"],
         "already holds a SynthOcc dataset", keep=lambda w: [w.synth]),
    Case("synth: misspelt preset", lambda w: ["synth", "--out", w.root / "s", "--preset", "tinny"], "Did you mean 'tiny'"),
    # ---------------------------------------------------------------- run folders (nothing overwritten)
    Case("train into a finished run", lambda w: _train(w, w.run),
         "already holds a finished training run (model_final.pth after 1 epoch)", keep=lambda w: [w.run]),
    Case("train into an unfinished run", lambda w: _train(w, w.partial),
         "Pass --resume to continue it, --output with another folder for a new run, or --overwrite",
         keep=lambda w: [w.partial]),
    Case("demo into a finished run", lambda w: ["demo", "--output", w.run, "--data-root", w.root / "demo_data"],
         "already holds a finished training run", keep=lambda w: [w.run], absent=lambda w: [w.root / "demo_data"]),
    Case("--resume together with --overwrite", lambda w: _train(w, w.partial, "--resume", "--overwrite"),
         "pass one of them", keep=lambda w: [w.partial]),
    Case("--resume with nothing to resume", lambda w: _tr(w, "--resume"), "nothing to resume"),
    Case("--output is a file", lambda w: _train(w, w.broken / "a_file"), "is a file",
         keep=lambda w: [w.broken / "a_file"]),
    Case("interrupted run with a truncated last.pth", lambda w: _resume_truncated(w),
         "cannot read checkpoint", keep=lambda w: [w.root / "cut_run"]),
    # ---------------------------------------------------------------- checkpoints
    Case("checkpoint missing", lambda w: _ts(w)[:2] + [w.root / "missing.pth"], "checkpoint not found"),
    Case("checkpoint empty", lambda w: ["test", "--weights", w.broken / "empty.pth"], "the file is empty (0 bytes)"),
    Case("checkpoint is a text file", lambda w: ["test", "--weights", w.broken / "text.pth"],
         "it is a text file, not a PyTorch file (it starts with 'hello, I am not a checkpoint')"),
    Case("checkpoint is a foreign pickle", lambda w: ["test", "--weights", w.broken / "foreign.pth"],
         "does not unpickle (loading them could run code)"),
    Case("checkpoint truncated", lambda w: ["test", "--weights", w.broken / "truncated.pth"], "truncated or corrupt"),
    Case("checkpoint is a plain state dict", lambda w: ["test", "--weights", w.broken / "plain.pth"],
         "is not an occreid checkpoint"),
    Case("checkpoint is ImageNet weights", lambda w: ["index", "--weights", w.broken / "imagenet.pth", "--images",
                                                      w.gallery, "--out", w.root / "x.idx"],
         "pass them as model.pretrained=PATH", absent=lambda w: [w.root / "x.idx"]),
    Case("gallery index given as weights", lambda w: ["export", "--weights", w.index, "--out", w.root / "m.safetensors"],
         "is a gallery index", absent=lambda w: [w.root / "m.safetensors"]),
    Case("config for another model", lambda w: _ts(w, "--config", MARKET_CFG), "holds a baseline/vit_nano model"),
    # ---------------------------------------------------------------- images and folders
    Case("index: image folder missing", lambda w: ["index", "--weights", w.ckpt, "--images", w.root / "nope", "--out", w.root / "x.idx"],
         "gallery folder not found", before_model=True, absent=lambda w: [w.root / "x.idx"]),
    Case("index: image folder empty", lambda w: ["index", "--weights", w.ckpt, "--images", w.root / "empty_folder",
                                                 "--out", w.root / "x.idx"],
         "no images found under", before_model=True),
    Case("index --strict with an unreadable image", lambda w: ["index", "--weights", w.ckpt, "--images", w.gallery_bad,
                                                               "--out", w.root / "x.idx", "--strict", "--device", "cpu"],
         "corrupt or truncated image file", absent=lambda w: [w.root / "x.idx"], keep=lambda w: [w.gallery_bad]),
    Case("index: no image readable", lambda w: ["index", "--weights", w.ckpt, "--images", w.gallery_unreadable,
                                                "--out", w.root / "x.idx", "--device", "cpu"],
         "none of the 2 images could be read", absent=lambda w: [w.root / "x.idx"]),
    Case("index --out is a folder", lambda w: ["index", "--weights", w.ckpt, "--images", w.gallery, "--out", w.root / "empty_folder"],
         "is a folder; pass the path of the file to write", before_model=True),
    Case("search: query missing", lambda w: _search(w, "--query", w.root / "none.jpg"), "image file not found"),
    Case("search: query not an image", lambda w: _search(w, "--query", w.broken / "fake.jpg"), "not an image file"),
    Case("search: query empty file", lambda w: _search(w, "--query", w.broken / "zero.jpg"), "not an image file"),
    Case("search: query truncated", lambda w: _search(w, "--query", w.broken / "cut.jpg"), "corrupt or truncated image file"),
    Case("search: query truncated, decoded in a worker process",
         lambda w: _search(w, "--query", w.broken / "cut.jpg", "--workers", "1"), "corrupt or truncated image file"),
    Case("search: index missing", lambda w: _search(w, "--query", w.query, index=w.root / "none.idx"), "gallery index not found"),
    Case("search: checkpoint given as index", lambda w: _search(w, "--query", w.query, index=w.ckpt), "It is a model checkpoint"),
    Case("search: index is a text file", lambda w: _search(w, "--query", w.query, index=w.broken / "text.pth"),
         "cannot read gallery index"),
    Case("search: index of another model", lambda w: _search(w, "--query", w.query, "--weights", w.other_ckpt),
         "built with another model"),
    Case("search: faiss backend without a faiss index", lambda w: _search(w, "--query", w.query, "--backend", "faiss"),
         "has no faiss index"),
    Case("visualize: unreadable image", lambda w: ["visualize", "--weights", w.ckpt, "--out", w.root / "viz_img",
                                                   "--images", w.broken / "cut.jpg", "--device", "cpu"],
         "cut.jpg"),
    # ---------------------------------------------------------------- optional extras, before any work
    Case("export to ONNX without onnx", lambda w: ["export", "--weights", w.ckpt, "--out", w.root / "m.onnx"],
         "exporting to ONNX needs the onnx package, which is not installed: pip install 'occreid[onnx]'",
         setup=_no_module("onnx"), before_model=True, absent=lambda w: [w.root / "m.onnx"]),
    Case("export --check without onnxruntime", lambda w: ["export", "--weights", w.ckpt, "--out", w.root / "m.onnx", "--check"],
         "needs the onnxruntime package, which is not installed: pip install 'occreid[onnx]'",
         setup=_no_module("onnxruntime"), before_model=True, absent=lambda w: [w.root / "m.onnx"]),
    Case("index --faiss without faiss", lambda w: ["index", "--weights", w.ckpt, "--images", w.gallery, "--out",
                                                   w.root / "f.idx", "--faiss", "ivf"],
         "pip install 'occreid[faiss]'", setup=_no_module("faiss"), before_model=True, absent=lambda w: [w.root / "f.idx"]),
    Case("index: unknown faiss kind", lambda w: ["index", "--weights", w.ckpt, "--images", w.gallery, "--out",
                                                 w.root / "f.idx", "--faiss", "quantum"],
         "unknown faiss index kind 'quantum'", before_model=True),
    Case("index: --nprobe without --faiss", lambda w: ["index", "--weights", w.ckpt, "--images", w.gallery, "--out",
                                                       w.root / "f.idx", "--nprobe", "4"],
         "pass --faiss ivf", before_model=True),
    Case("export: unknown format", lambda w: ["export", "--weights", w.ckpt, "--out", w.root / "m.bin"],
         "name it *.onnx or *.safetensors", before_model=True),
    # ---------------------------------------------------------------- usage
    Case("required option missing", lambda w: ["train", *TINY_OVERRIDES], "occreid train: the following arguments are required: --config"),
    Case("option value not a number", lambda w: ["search", "--index", w.index, "--query", w.query, "--topk", "ten"],
         "argument --topk: expected a whole number >= 1, got 'ten'"),
    Case("option value out of range", lambda w: ["index", "--weights", w.ckpt, "--images", w.gallery, "--out", w.root / "x.idx",
                                                 "--batch-size", "0"],
         "argument --batch-size: expected a whole number >= 1, got 0"),
    Case("unknown device", lambda w: ["export", "--weights", w.ckpt, "--out", w.root / "d.safetensors", "--device", "gpu0"],
         "unknown device 'gpu0'; use auto, cpu, cuda or cuda:N", absent=lambda w: [w.root / "d.safetensors"]),
    Case("unknown option", lambda w: ["test", "--weights", w.ckpt, "--dataroot", w.data], "unrecognized arguments: --dataroot"),
    Case("unknown command", lambda w: ["trian", "--config", MARKET_CFG], "invalid choice: 'trian'"),
]


def _resume_truncated(w):
    """A run whose last.pth was cut short (a copy or disk that failed): --resume says so."""
    run = w.root / "cut_run"
    if not run.exists():
        run.mkdir()
        shutil.copy2(w.run / "log.jsonl", run / "log.jsonl")
        (run / "last.pth").write_bytes((w.run / "last.pth").read_bytes()[:5000])
    return _train(w, run, "--resume")


def test_suite_is_large_enough():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, world, capsys, monkeypatch):
    argv = case.argv(world)
    keep = case.keep(world)
    before = snapshot(*keep)
    assert before or not keep
    for p in case.absent(world):
        assert not p.exists(), p
    if case.setup is not None:
        case.setup(monkeypatch, world)
    if case.before_model:
        import occreid.inference

        def no_model(*a, **k):
            raise AssertionError("the model was loaded before the mistake was reported")

        monkeypatch.setattr(occreid.inference.FeatureExtractor, "__init__", no_model)
    capsys.readouterr()
    rc = run_cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("occreid: error: "), err
    assert case.expect in lines[0], lines[0]
    assert "Traceback" not in err and "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert snapshot(*keep) == before  # nothing lost or changed
    for p in case.absent(world):
        assert not p.exists(), p


def test_docs_count_the_suite():
    text = (REPO / "docs" / "usage.md").read_text()
    section = text[text.index("## Troubleshooting"):]
    m = re.search(r"(\d+) cases", section)
    assert m is not None and int(m.group(1)) == len(CASES), "update the count in docs/usage.md"


# --------------------------------------------------------------------------------------------
# What replaced silent damage
# --------------------------------------------------------------------------------------------


def test_overwrite_moves_the_old_run_aside_and_the_new_log_starts_fresh(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    old = snapshot(run)
    assert run_cli(_train(world, run, "--overwrite", "solver.max_epochs=2")) == 0
    aside = tmp_path / "run.old-1"
    assert f"moved to {aside}" in capsys.readouterr().out
    assert {k.replace(str(aside), str(run)): v for k, v in snapshot(aside).items()} == old  # every byte kept
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    # a second --overwrite picks the next free name
    assert run_cli(_train(world, run, "--overwrite", "solver.max_epochs=1")) == 0
    assert (tmp_path / "run.old-2" / "model_final.pth").is_file() and (aside / "model_final.pth").is_file()


def test_a_new_run_truncates_a_stale_log_and_a_resumed_one_drops_repeated_epochs(world, tmp_path):
    from occreid.engine.rundir import run_state, trim_log

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "loss": 1.0}) + "\n" for e in (1, 2, 3)) + '{"epoch": 4, "lo')
    trim_log(log, 3)  # resuming after epoch 2: epoch 3 is trained again, the cut line dropped
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    trim_log(log, 1)
    assert log.read_text() == ""
    assert run_state(world.run).kind == "finished" and run_state(world.run).epochs == 1
    assert run_state(world.partial).kind == "partial"
    assert run_state(tmp_path / "nothing").kind == "none"
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.yaml").write_text("a: 1\n")
    assert run_state(tmp_path / "started").kind == "started"  # no checkpoint: a new run may start there


def test_index_skips_unreadable_images_with_a_count(world, tmp_path, capsys, caplog):
    out = tmp_path / "g.idx"
    with caplog.at_level(logging.WARNING):
        assert run_cli(["index", "--weights", world.ckpt, "--images", world.gallery_bad, "--out", out, "--device", "cpu"]) == 0
    n_good = len(list(world.gallery.glob("*.jpg")))
    assert f"indexed {n_good} images (1 unreadable skipped)" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipping an unreadable image" in m and "0100_c9s1_000100_00.jpg" in m for m in warnings)
    assert any(f"skipped 1 unreadable image of {n_good + 1}" in m and "--strict" in m for m in warnings)
    from occreid.retrieval import GalleryIndex

    index = GalleryIndex.load(out)
    assert len(index) == n_good and not any("0100_c9" in p for p in index.paths)
    ref = GalleryIndex.load(world.index)
    torch.testing.assert_close(index.features, ref.features)  # the same features as without the bad file
    assert index.pids.tolist() == ref.pids.tolist()


def test_index_works_from_any_folder_and_after_moving(world, tmp_path, monkeypatch, capsys):
    """Built with relative paths in one folder, searched from another, then moved as a whole."""
    site = tmp_path / "site"
    shutil.copytree(world.gallery, site / "gallery")
    shutil.copy2(world.ckpt, site / "model.pth")
    monkeypatch.chdir(site)
    assert run_cli(["index", "--weights", "model.pth", "--images", "gallery", "--out", "idx/g.idx", "--device", "cpu"]) == 0
    query = "gallery/" + world.query.name

    def search_from(folder: Path, index: Path, q: Path) -> List[dict]:
        monkeypatch.chdir(folder)
        capsys.readouterr()
        assert run_cli(["search", "--index", index, "--query", q, "--topk", "3", "--json", "-", "--device", "cpu"]) == 0
        return json.loads(capsys.readouterr().out)[0]["results"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    top = search_from(elsewhere, site / "idx" / "g.idx", site / query)
    assert Path(top[0]["path"]) == site / query and all(Path(r["path"]).is_file() for r in top)
    # the index alone copied elsewhere: the images (and weights) are found where they are
    shutil.copytree(site / "idx", tmp_path / "idx_alone")
    top_alone = search_from(elsewhere, tmp_path / "idx_alone" / "g.idx", site / query)
    assert [r["path"] for r in top_alone] == [r["path"] for r in top]
    moved = tmp_path / "moved"
    shutil.move(str(site), str(moved))
    top2 = search_from(elsewhere, moved / "idx" / "g.idx", moved / query)
    assert Path(top2[0]["path"]) == moved / query and all(Path(r["path"]).is_file() for r in top2)
    assert [Path(r["path"]).name for r in top2] == [Path(r["path"]).name for r in top]
    assert [r["score"] for r in top2] == pytest.approx([r["score"] for r in top], abs=1e-6)
    from occreid.retrieval import GalleryIndex

    assert GalleryIndex.load(moved / "idx" / "g.idx").model["weights"] == str(moved / "model.pth")


def test_output_files_follow_the_umask(world, tmp_path):
    from occreid.utils.io import atomic_save, atomic_write_text

    old = os.umask(0o022)
    try:
        assert atomic_write_text("x", tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        assert atomic_save({"x": torch.ones(1)}, tmp_path / "a.pth").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic_write_text("x", tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
        os.umask(0o002)
        assert atomic_write_text("x", tmp_path / "c.json").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
    want = 0o666 & ~old  # the files of the module's training run, written under the test's umask
    for name in ("model_final.pth", "last.pth", "metrics.json", "config.yaml", "log.jsonl", "curves.png"):
        assert (world.run / name).stat().st_mode & 0o777 == want, name


def test_overrides_anywhere_on_the_command_line():
    args = build_parser().parse_args(["train", "--config", "C", "a=1", "--output", "run", "b=2", "--resume", "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"] and args.output == "run" and args.resume
    args = build_parser().parse_args(["test", "x=1", "--weights", "w.pth", "y=2", "--device", "cpu"])
    assert args.overrides == ["x=1", "y=2"] and args.weights == "w.pth"
    args = build_parser().parse_args(["ablate", "fed-k", "x=1", "--jobs", "2", "y=2"])
    assert args.table == "fed-k" and args.overrides == ["x=1", "y=2"] and args.jobs == 2


def test_every_option_has_help_and_shows_its_default():
    import argparse

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    self_explaining = {"preview", "json", "images"}  # "also write ...", "draw ... for these images only"
    checked = 0
    for name, sub in [("occreid", parser)] + sorted(subs.choices.items()):
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{what} has no help text"
            checked += 1
            if not action.option_strings or action.required or action.nargs == 0:
                continue  # positionals, required options, flags
            shown = " ".join((action.help % {"default": action.default}).split())
            if action.default is not None:
                value = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
                assert f"(default: {value}" in shown, f"{what}: {shown!r} does not show its default {value}"
            elif action.dest not in self_explaining:
                assert "default" in shown, f"{what}: {shown!r} does not say what happens without it"
    assert checked > 60
    demo_help = " ".join(subs.choices["demo"].format_help().split())
    for flag, default in (("--output", "outputs/demo"), ("--data-root", "data"), ("--seed", "0"), ("--device", "auto")):
        assert flag in demo_help and f"(default: {default})" in demo_help
    assert "--epochs EPOCHS training epochs (default: solver.max_epochs of the demo config)" in demo_help
    test_help = " ".join(subs.choices["test"].format_help().split())
    assert "--data-root DATA_ROOT folder holding the dataset (default:" in test_help
    assert "--output OUTPUT folder for metrics.json (default:" in test_help
    assert "--device DEVICE cpu, cuda, cuda:1, ... (default: auto" in test_help
    assert "-v, --verbose log debug messages too (default: info and above)" in " ".join(parser.format_help().split())


def test_visualize_help_lists_every_file_it_writes(world, tmp_path):
    import argparse

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = subs.choices["visualize"].format_help()
    ck = make_tiny_checkpoint(tmp_path / "fed.pth", "fed")
    (tmp_path / "log.jsonl").write_text((world.run / "log.jsonl").read_text())  # next to the weights: curves.png
    out = tmp_path / "viz"
    assert run_cli(["visualize", "--weights", ck, "--data-root", world.data, "--out", out, "--device", "cpu",
                    "--num-queries", "3", "--topk", "3"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert {"metrics.json", "ranked_lists.png", "fed_occlusion_scores.png", "curves.png", "report.html",
            "report_cmc.png"} <= set(written)
    for name in written:
        assert name in text, f"visualize writes {name} but its --help does not say so"
    for name in ("dpm_mask_statistics.png",):
        assert name in text


def test_config_values_are_converted_or_refused_by_type():
    from occreid.config import load_config
    from occreid.utils.io import OccReIDError

    cfg = load_config(None, ["solver.weight_decay=1e-4", "solver.max_epochs=10.0", "solver.base_lr=1",
                             "progress=on", "output_dir=2024", "model.stride=[8, 8]", "data.npo=true"])
    assert cfg["solver"]["weight_decay"] == 1e-4 and isinstance(cfg["solver"]["weight_decay"], float)
    assert cfg["solver"]["max_epochs"] == 10 and isinstance(cfg["solver"]["max_epochs"], int)
    assert cfg["solver"]["base_lr"] == 1.0 and isinstance(cfg["solver"]["base_lr"], float)
    assert cfg["progress"] == "on" and cfg["output_dir"] == "2024" and cfg["model"]["stride"] == [8, 8]
    cfg = load_config(None, ["solver.grad_clip=5", "model.triplet_margin=null", "data.occluders=[a, b]"])
    assert cfg["solver"]["grad_clip"] == 5.0 and cfg["model"]["triplet_margin"] is None
    assert cfg["data"]["occluders"] == ["a", "b"]
    for bad, msg in (("solver.max_epochs=null", "must be an integer"), ("tensorboard=1", "must be true or false"),
                     ("device=0", "must be a string"), ("solver.seed=[1]", "must be an integer"),
                     ("solver.grad_clip=abc", "must be a number or null (default: null), got the text 'abc'"),
                     ("data.occluders=3", "must be a string or a list or null")):
        with pytest.raises(OccReIDError, match=re.escape(msg)):
            load_config(None, [bad])
    with pytest.raises(OccReIDError, match=r"'solver.max_epochs' in arguments must be an integer"):
        load_config(None, extra={"solver": {"max_epochs": "many"}})


def test_small_odd_and_non_rgb_images_are_noted_once(tmp_path, caplog):
    from occreid.utils.io import read_image, reset_image_notices

    reset_image_notices()
    paths = {}
    for name, mode, size in (("tiny", "RGB", (10, 10)), ("tiny2", "RGB", (8, 12)), ("wide", "RGB", (200, 20)),
                             ("gray", "L", (16, 32)), ("gray2", "L", (16, 32)), ("rgba", "RGBA", (16, 32))):
        paths[name] = tmp_path / f"{name}.png"
        Image.new(mode, size).save(paths[name])
    with caplog.at_level(logging.INFO, logger="occreid.utils.io"):
        for name in ("tiny", "tiny2", "wide", "gray", "gray2", "rgba", "rgba"):
            im = read_image(paths[name])
            assert im.mode == "RGB" and im.size == Image.open(paths[name]).size
    msgs = [r.getMessage() for r in caplog.records if r.name == "occreid.utils.io"]
    assert len(msgs) == 4, msgs  # small, aspect ratio, grayscale, alpha: once each
    assert "tiny.png is only 10x10 pixels" in msgs[0] and "smaller than one 16-pixel ViT patch" in msgs[0]
    assert "wide.png is 200x20 pixels" in msgs[1] and "extreme aspect ratio" in msgs[1]
    assert "gray.png is grayscale" in msgs[2] and "rgba.png has an alpha channel" in msgs[3]
    assert all("said once per run" in m for m in msgs)
    reset_image_notices()


def test_evaluating_generates_synthocc_only_when_asked(world, tmp_path, capsys):
    target = tmp_path / "fresh"
    assert run_cli(["test", "--weights", world.synth_ckpt, "--data-root", target, "--output", tmp_path / "eval",
                    "--device", "cpu", "--generate-data"]) == 0
    info = json.loads((target / "SynthOcc" / "synthocc.json").read_text())
    assert (info["preset"], info["seed"]) == ("tiny", 0)  # the preset and seed the model asks for
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["dataset"] == "synthocc" and 0.0 <= m["mAP"] <= 1.0 and m["num_valid_queries"] > 0
    # the folder holding the same preset and seed is used as it is
    assert snapshot(target)
    before = snapshot(target)
    assert run_cli(["test", "--weights", world.synth_ckpt, "--data-root", target, "--output", tmp_path / "eval2",
                    "--device", "cpu"]) == 0
    assert snapshot(target) == before
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["mAP"] == pytest.approx(m["mAP"], abs=1e-6)


# --------------------------------------------------------------------------------------------
# kill -9, then --resume
# --------------------------------------------------------------------------------------------

_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    where, out = sys.argv[1], sys.argv[2]
    argv = sys.argv[3:]
    if where == "mid-epoch":  # SIGKILL while epoch 2 is loading its second batch
        import occreid.data.image_dataset as m
        orig, seen = m.ImageDataset.__getitem__, [0]
        def getitem(self, i):
            if os.path.exists(os.path.join(out, "last.pth")):
                seen[0] += 1
                if seen[0] == 20:
                    os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, i)
        m.ImageDataset.__getitem__ = getitem
    elif where == "mid-write":  # SIGKILL with epoch 2's last.pth written but not yet renamed into place
        real, calls = os.replace, [0]
        def replace(src, dst, *a, **k):
            if os.path.basename(str(dst)) == "last.pth":
                calls[0] += 1
                if calls[0] == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *a, **k)
        os.replace = replace
    from occreid.cli import main
    sys.exit(main(argv))
    """
)


def _weights(path: Path) -> Dict[str, torch.Tensor]:
    from occreid.engine.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert run_cli(_train(world, out, "solver.max_epochs=3")) == 0
    return out


@pytest.mark.parametrize("where", ["mid-epoch", "mid-write"])
def test_kill_9_then_resume_reaches_the_same_weights(world, uninterrupted, tmp_path, where):
    out = tmp_path / "run"
    argv = _train(world, out, "solver.max_epochs=3")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _KILLER, where, str(out), *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    from occreid.engine.checkpoint import load_checkpoint

    assert load_checkpoint(out / "last.pth")["epoch"] == 1 and not (out / "model_final.pth").exists()
    if where == "mid-write":
        assert list(out.glob(".last.pth.*.tmp"))  # the half-finished write, never renamed into place
    # a new run without --resume would overwrite it: refused
    assert run_cli(argv) == 2
    assert run_cli(argv + ["--resume"]) == 0
    got, want = _weights(out / "model_final.pth"), _weights(uninterrupted / "model_final.pth")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_kill_between_the_last_checkpoint_and_model_final(world, uninterrupted, tmp_path):
    """Killed after the last epoch's last.pth but before model_final.pth: --resume writes it."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pth", "log.jsonl", "config.yaml", "metrics.json"):
        shutil.copy2(uninterrupted / name, out / name)
    argv = _train(world, out, "solver.max_epochs=3")
    assert run_cli(argv + ["--resume"]) == 0
    got, want = _weights(out / "model_final.pth"), _weights(uninterrupted / "model_final.pth")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
