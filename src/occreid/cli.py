"""The ``occreid`` command.

    occreid demo                       # SynthOcc + tiny ViT baseline on the CPU, metrics and pictures
    occreid train --config configs/occluded_duke/vit_base.yaml --data-root DATA [key=value ...]
    occreid test  --config CFG --weights OUTPUT/model_final.pth [--data-root DATA]
    occreid synth --out DIR [--preset demo] [--seed 0] [--preview grid.png]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from .utils.io import OccReIDError

logger = logging.getLogger("occreid")


def _setup_logging(verbose: bool = False) -> None:
    from .engine import distributed as du

    level = logging.DEBUG if verbose else logging.INFO
    if not du.is_main() and "RANK" in __import__("os").environ and __import__("os").environ.get("RANK") != "0":
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _cfg_from_args(args, extra_overrides: Optional[List[str]] = None):
    from .config import load_config

    overrides = list(extra_overrides or [])
    if getattr(args, "data_root", None):
        overrides.append(f"data.root={args.data_root}")
    if getattr(args, "output", None):
        overrides.append(f"output_dir={args.output}")
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    overrides += list(getattr(args, "overrides", []) or [])
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from .engine.trainer import Trainer

    cfg = _cfg_from_args(args)
    trainer = Trainer(cfg, resume=args.resume)
    metrics = trainer.train()
    if metrics:
        _print_metrics(metrics)
        print(f"outputs in {cfg['output_dir']}")
    return 0


def cmd_test(args) -> int:
    import torch

    from .config import load_config
    from .engine.build import build_datasets, model_from_checkpoint, resolve_amp, resolve_device
    from .engine.checkpoint import load_checkpoint
    from .engine.trainer import evaluate_model
    from .utils.io import atomic_write_text

    ckpt = load_checkpoint(args.weights)
    if args.config:
        cfg = _cfg_from_args(args)
    else:  # the checkpoint's own config, with command-line overrides
        ov = [f"{k}={v}" for k, v in (("data.root", args.data_root), ("output_dir", args.output),
                                        ("device", args.device)) if v]
        cfg = load_config(None, ov + list(args.overrides or []), base=ckpt["config"])
    meta = ckpt["model_meta"]
    for key in ("name", "backbone"):
        want = meta["method"] if key == "name" else meta["backbone"]
        if cfg["model"][key] != want:
            raise OccReIDError(
                f"--weights {args.weights} holds a {meta['method']}/{meta['backbone']} model but the config asks for "
                f"model.{key}={cfg['model'][key]!r}"
            )
    device = resolve_device(cfg["device"])
    amp = resolve_amp(cfg["solver"]["amp"], device)
    model = model_from_checkpoint(ckpt, device)
    _, test_ds = build_datasets(cfg)
    metrics = evaluate_model(model, cfg, test_ds, device, amp)
    metrics.update(dataset=test_ds.name, method=meta["method"], epoch=int(ckpt["epoch"]), checkpoint=str(args.weights))
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(metrics, indent=2), out / "metrics.json")
    _print_metrics(metrics)
    print(f"metrics written to {out / 'metrics.json'}")
    return 0


def _print_metrics(m) -> None:
    print(
        f"{m.get('dataset', '')} {m.get('method', '')}: mAP {m['mAP']:.1%}  R1 {m['rank1']:.1%}  "
        f"R5 {m['rank5']:.1%}  R10 {m['rank10']:.1%}  mINP {m['mINP']:.1%}  "
        f"({m['num_valid_queries']} queries, {m['num_skipped_queries']} skipped)"
    )
    for g, v in (m.get("by_occlusion") or {}).items():
        print(f"  {g:>9}: mAP {v['mAP']:.1%}  R1 {v['rank1']:.1%}  ({v['num_queries']} queries)")


def cmd_synth(args) -> int:
    from .data.synthetic import generate_synthocc, save_preview_grid

    out = generate_synthocc(args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    print(f"SynthOcc ({args.preset}, seed {args.seed}) in {out}")
    if args.preview:
        png = save_preview_grid(out, args.preview)
        print(f"preview grid: {png}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(
        output=args.output,
        data_root=args.data_root,
        method=args.method,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        overrides=args.overrides,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="occreid", description="Occluded person re-identification.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="YAML config (configs/...)")
    t.add_argument("--data-root", help="folder holding the datasets (overrides data.root)")
    t.add_argument("--output", help="output folder (overrides output_dir)")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: auto)")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pth")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. solver.max_epochs=10")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("test", help="evaluate a trained checkpoint")
    e.add_argument("--config", help="YAML config (default: the checkpoint's own)")
    e.add_argument("--weights", required=True, help="checkpoint written by occreid train")
    e.add_argument("--data-root")
    e.add_argument("--output")
    e.add_argument("--device")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(func=cmd_test)

    s = sub.add_parser("synth", help="generate the SynthOcc benchmark")
    s.add_argument("--out", required=True, help="dataset folder to write")
    s.add_argument("--preset", default="demo", help="tiny | demo | full")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--preview", help="also write a contact sheet PNG of generated images")
    s.set_defaults(func=cmd_synth)

    d = sub.add_parser("demo", help="SynthOcc + tiny ViT on the CPU: train, evaluate, draw results")
    d.add_argument("--output", default="outputs/demo")
    d.add_argument("--data-root", default="data")
    d.add_argument("--method", default="baseline")
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except OccReIDError as exc:
        print(f"occreid: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("occreid: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
