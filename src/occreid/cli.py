"""The ``occreid`` command.

    occreid demo                       # SynthOcc + tiny ViT baseline on the CPU, metrics and pictures
    occreid train --config configs/occluded_duke/vit_base.yaml --data-root DATA [--resume|--overwrite] [key=value ...]
    occreid test  --config CFG --weights OUTPUT/model_final.pth [--data-root DATA] [--generate-data]
    occreid synth --out DIR [--preset demo] [--seed 0] [--preview grid.png]
    occreid index --weights CKPT --images DIR --out INDEX [--faiss flat|ivf|ivfpq|hnsw]
    occreid search --index INDEX --query IMG [IMG ...] [--topk 10]
    occreid visualize --weights CKPT --out DIR [--data-root DATA] [--images IMG ...]
    occreid export --weights CKPT --out reid.onnx|reid.safetensors [--check]
"""

from __future__ import annotations

from . import _env  # noqa: F401  (first: environment read when torch is imported)

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from .ablation import RECIPES, format_markdown, run_table, table_dir
from .config import load_config
from .data.synthetic import generate_synthocc, save_preview_grid, synthocc_generation
from .demo import DEMO_COMPARE, demo_config, print_metrics, run_demo, side_by_side
from .engine.build import build_datasets, model_from_checkpoint, resolve_amp, resolve_device
from .engine.curves import plot_training_log
from .engine.rundir import prepare_run_dir
from .engine.trainer import Trainer, evaluate_model
from .evaluation.extract import evaluate_features, split_query_gallery
from .export import check_onnx, export_onnx, export_safetensors, load_export
from .inference import FeatureExtractor, load_model_source
from .retrieval import FaissSearcher, GalleryIndex, list_gallery_images
from .retrieval.faiss_backend import require_faiss
from .utils.io import OccReIDError, atomic_write_text, require_module
from .viz.occlusion import draw_mask_statistics, draw_occlusion_scores, mask_statistics
from .viz.ranklist import draw_ranked_lists, pick_queries, top_matches
from .viz.report import write_report

logger = logging.getLogger("occreid")


def _setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with -v) on the main process; other torchrun ranks only log warnings."""
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _cfg_from_args(args, extra_overrides: Optional[List[str]] = None):
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
    cfg = _cfg_from_args(args)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the main process looks (and moves)
        aside = prepare_run_dir(cfg["output_dir"], resume=args.resume, overwrite=args.overwrite)
        if aside is not None:
            print(f"the previous run in {cfg['output_dir']} was moved to {aside}")
    trainer = Trainer(cfg, resume=args.resume)
    metrics = trainer.train()
    if metrics:
        _print_metrics(metrics)
        print(f"outputs in {cfg['output_dir']}")
    return 0


def cmd_test(args) -> int:
    cfg = _cfg_from_args(args) if args.config else None
    # an occreid checkpoint, or an official one (which --config describes)
    ckpt = load_model_source(args.weights, config=cfg, memory=args.memory)
    if cfg is None:  # the checkpoint's own config, with command-line overrides
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
    model = model_from_checkpoint(ckpt, device, cfg)
    with synthocc_generation(args.generate_data):  # evaluating generates SynthOcc only when asked
        _, test_ds = build_datasets(cfg)
    metrics = evaluate_model(model, cfg, test_ds, device, amp)
    metrics.update(dataset=test_ds.name, method=meta["method"], epoch=ckpt.get("epoch"), checkpoint=str(args.weights))
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(metrics, indent=2), out / "metrics.json")
    _print_metrics(metrics)
    print(f"metrics written to {out / 'metrics.json'}")
    return 0


def _print_metrics(m) -> None:
    print_metrics(m)


def cmd_synth(args) -> int:
    out = generate_synthocc(args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    print(f"SynthOcc ({args.preset}, seed {args.seed}) in {out}")
    if args.preview:
        png = save_preview_grid(out, args.preview)
        print(f"preview grid: {png}")
    return 0


def cmd_demo(args) -> int:
    compare = None if args.compare in ("none", args.method) else args.compare
    runs = [(args.method, args.output)]
    if compare is not None:
        demo_config(compare)  # an unknown method fails now, not after the first training
        runs.append((compare, f"{args.output}_{compare}"))
    results = {}
    for method, out in runs:
        aside = prepare_run_dir(out, overwrite=args.overwrite, command="demo")
        if aside is not None:
            print(f"the previous demo run in {out} was moved to {aside}")
        if method != args.method:
            print(f"\n== {method} (beside {args.method}), in {out}")
        results[method] = run_demo(
            output=out,
            data_root=args.data_root,
            method=method,
            epochs=args.epochs,
            seed=args.seed,
            device=args.device,
            overrides=args.overrides,
        )
    if len(results) > 1:
        print("\n" + side_by_side(results))
    return 0


def cmd_ablate(args) -> int:
    result = run_table(
        args.table, args.output, args.seeds, jobs=args.jobs, threads=args.threads,
        data_root=args.data_root, extra_overrides=args.overrides, dry_run=args.dry_run, recipe=args.recipe,
    )
    if result:
        print(format_markdown(result))
        print(f"results in {table_dir(args.output, args.table, args.recipe)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """``occreid`` parsers: config overrides (positionals) may stand anywhere among the options
    (argparse's intermixed parsing), and a usage error is one ``occreid: error: ...`` line."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        intermixable = not any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions())
        if self._parsing or not intermixable:
            return super().parse_known_args(args, namespace)
        self._parsing = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False

    def error(self, message):
        where = "" if self.prog == "occreid" else f"{self.prog}: "
        self.exit(2, f"occreid: error: {where}{message} (see `{self.prog} --help`)\n")


def _whole_number(minimum: int):
    """An argparse type: a whole number >= ``minimum``, with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {v}")
        return v

    parse.__name__ = f"whole number >= {minimum}"
    return parse


_positive_int = _whole_number(1)
_count = _whole_number(0)


def _display_path(path: str) -> str:
    """A gallery path as printed: relative to the working folder when it lies inside it."""
    if os.path.isabs(path):
        try:
            rel = os.path.relpath(path)
        except ValueError:  # another drive
            return path
        if not rel.startswith(os.pardir):
            return rel
    return path


def _check_out_file(path: str, option: str) -> None:
    """An output file path that is an existing folder fails before any work."""
    if Path(path).is_dir():
        raise OccReIDError(f"{option} {path} is a folder; pass the path of the file to write")


_MEMORY_HELP = ("official FED checkpoints only: the memory file saved beside it (default: transformermemory_EPOCH.pth "
                "next to --weights transformer_EPOCH.pth, if present)")
_OVERRIDES_HELP = "config overrides key=value, anywhere on the command line (e.g. solver.max_epochs=10)"
_DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: auto = CUDA when available, else the CPU)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="occreid", description="Occluded person re-identification.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages too (default: info and above)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model from a YAML config. A folder that holds a run is never "
                                   "overwritten: continue it (--resume), train elsewhere (--output) or move it "
                                   "aside (--overwrite).")
    t.add_argument("--config", required=True, help="YAML config: a file, or a shipped one (synthocc/baseline_demo.yaml)")
    t.add_argument("--data-root", help="folder holding the datasets (default: data.root of the config)")
    t.add_argument("--output", help="output folder (default: output_dir of the config)")
    t.add_argument("--device", help=_DEVICE_HELP)
    t.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last.pth")
    t.add_argument("--overwrite", action="store_true",
                   help="move a run already in the output folder aside to <folder>.old-<n> (nothing is deleted) "
                        "and start afresh")
    t.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("test", help="evaluate a trained checkpoint",
                       description="Evaluate a trained checkpoint on its test set; writes OUTPUT/metrics.json.")
    e.add_argument("--config", help="YAML config (default: the checkpoint's own)")
    e.add_argument("--weights", required=True, help="checkpoint written by occreid train (model_final.pth), or an "
                   "official TransReID/FED/DPM checkpoint with the --config of its architecture")
    e.add_argument("--memory", help=_MEMORY_HELP)
    e.add_argument("--data-root", help="folder holding the dataset (default: data.root of the checkpoint's config)")
    e.add_argument("--output", help="folder for metrics.json (default: output_dir of the checkpoint's config)")
    e.add_argument("--device", help=_DEVICE_HELP)
    e.add_argument("--generate-data", action="store_true",
                   help="generate SynthOcc (the config's preset and seed) when its folder is absent or empty "
                        "(default: a missing dataset is an error)")
    e.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)
    e.set_defaults(func=cmd_test)

    s = sub.add_parser("synth", help="generate the SynthOcc benchmark",
                       description="Generate the SynthOcc benchmark (its preset and seed are recorded in "
                                   "synthocc.json).")
    s.add_argument("--out", required=True, help="dataset folder to write")
    s.add_argument("--preset", default="demo_rich",
                   help="tiny_rich | demo_rich | full_rich (representative), or an older layout: tiny | demo | "
                        "full, *_detector, *_cues (default: %(default)s)")
    s.add_argument("--seed", type=_count, default=0, help="random seed (default: %(default)s)")
    s.add_argument("--overwrite", action="store_true", help="replace a dataset of another preset or seed in --out")
    s.add_argument("--preview", help="also write a contact sheet PNG of generated images")
    s.set_defaults(func=cmd_synth)

    d = sub.add_parser("demo", help="SynthOcc + tiny ViT on the CPU: train, evaluate, draw results",
                       description="Generate SynthOcc, train a tiny ViT, evaluate it per occlusion type and draw "
                                   "training curves and ranked lists.")
    d.add_argument("--output", default="outputs/demo", help="output folder (default: %(default)s)")
    d.add_argument("--data-root", default="data",
                   help="folder for the SynthOcc dataset, generated into DATA_ROOT/SynthOcc on first use "
                        "(default: %(default)s)")
    d.add_argument("--method", default="baseline", help="baseline | fed | dpm (default: %(default)s)")
    d.add_argument("--compare", default=DEMO_COMPARE,
                   help="a second method trained the same way into OUTPUT_<method> and shown beside the first "
                        "on occluded queries; none: only --method (default: %(default)s)")
    d.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs (default: solver.max_epochs of the demo config)")
    d.add_argument("--seed", type=_count, default=0, help="training seed, solver.seed (default: %(default)s)")
    d.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    d.add_argument("--overwrite", action="store_true",
                   help="move a run already in the output folder aside to <folder>.old-<n> (nothing is deleted)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("ablate", help="run a paper ablation table on SynthOcc (FED/DPM Tables 3-4)",
                       description="Run a paper ablation table on SynthOcc; finished rows are kept, "
                                   "interrupted ones resumed.")
    a.add_argument("table", help="fed-components | fed-k | fed-switches | dpm-components | dpm-losses")
    a.add_argument("--output", default="outputs/ablations", help="runs and result tables go here (default: %(default)s)")
    a.add_argument("--seeds", type=_count, nargs="+", default=[0, 1, 2],
                   help="seeds of the headline rows; the others use the first (default: 0 1 2)")
    a.add_argument("--jobs", type=_positive_int, default=1, help="runs trained at the same time (default: %(default)s)")
    a.add_argument("--threads", type=_positive_int, help="torch threads per run (default: cores / jobs)")
    a.add_argument("--data-root", help="folder holding SynthOcc (default: data.root of the configs)")
    a.add_argument("--dry-run", action="store_true", help="print the training commands left to run")
    a.add_argument("--recipe", default="current", choices=RECIPES,
                   help="demo recipe: current (configs/synthocc) or v1 (configs/synthocc/v1, the first tables "
                        "of docs/results.md) (default: %(default)s)")
    a.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every row")
    a.set_defaults(func=cmd_ablate)

    _add_use_commands(sub)  # index, search, visualize, export (using a trained model)
    return p


# --------------------------------------------------------------------------------------------
# Using a trained model: index, search, visualize, export
# --------------------------------------------------------------------------------------------


def _extractor_from_args(args, weights: Optional[str] = None):
    return FeatureExtractor(
        weights or args.weights,
        device=args.device or "auto",
        batch_size=args.batch_size,
        num_workers=args.workers,
        config=args.config,
        memory=args.memory,
    )


def cmd_index(args) -> int:
    _check_out_file(args.out, "--out")
    kw = {k: v for k, v in (("nlist", args.nlist), ("nprobe", args.nprobe)) if v is not None}
    if args.faiss:  # before any extraction: a missing extra or a bad kind fails at once
        require_faiss()
        FaissSearcher(args.faiss, **kw)
    elif kw:
        raise OccReIDError("--nlist and --nprobe configure a faiss index: pass --faiss ivf (or another kind) too")
    list_gallery_images(args.images)  # a missing or empty folder fails before the model is loaded
    ex = _extractor_from_args(args)
    index = GalleryIndex.from_folder(ex, args.images, skip_unreadable=not args.strict)
    if args.faiss:
        index.add_faiss(args.faiss, **kw)
    index.save(args.out)
    if index.skipped:
        logger.warning("skipped %d unreadable image%s of %d (see the warnings above); pass --strict to stop at "
                       "the first one instead", len(index.skipped), "s" if len(index.skipped) != 1 else "",
                       len(index.skipped) + len(index))
    ids = "person/camera ids from the file names" if index.pids is not None else "no ids (file names are not <pid>_c<cam>...)"
    extra = f", faiss {index.faiss.describe()}" if index.faiss is not None else ""
    skipped = f" ({len(index.skipped)} unreadable skipped)" if index.skipped else ""
    print(f"indexed {len(index)} images{skipped} from {args.images}: {index.dim}-d {ex.method}/{ex.backbone} features "
          f"(model {ex.fingerprint}), {ids}, distance {index.retrieval['distance']}{extra}")
    print(f"index written to {args.out}")
    return 0


def cmd_search(args) -> int:
    if args.json and args.json != "-":
        _check_out_file(args.json, "--json")
    index = GalleryIndex.load(args.index)
    weights = args.weights or index.model.get("weights")
    if not weights:
        raise OccReIDError(f"{args.index} does not record its model weights; pass --weights CKPT")
    if not Path(weights).is_file():
        raise OccReIDError(
            f"the index was built with weights {weights}, which no longer exist; pass --weights with "
            "the same model (or rebuild the index)"
        )
    ex = _extractor_from_args(args, weights)
    index.check_model(ex)
    if index.faiss is not None and args.nprobe is not None:
        index.faiss.set_nprobe(args.nprobe)
    queries = list(args.query)
    feats = ex.extract(queries, camids=[args.query_camid] * len(queries) if ex.uses_cameras else None)
    res = index.search(feats, k=args.topk, backend=args.backend)
    rows = res.to_dicts()
    if args.json:
        payload = json.dumps([{"query": q, "results": r, "backend": res.backend} for q, r in zip(queries, rows)], indent=2)
        if args.json == "-":
            print(payload)
            return 0

        atomic_write_text(payload + "\n", args.json)
    score = "masked cosine" if index.is_masked else "cosine"
    for q, r in zip(queries, rows):
        print(f"query {q}  (top {len(r)} of {len(index)}, {res.backend}, score = {score})")
        for item in r:
            pid = f"  pid {item['pid']:>5}" if "pid" in item else ""
            print(f"  {item['rank']:>3}  {item['score']:.6f}{pid}  {_display_path(item['path'])}")
    if args.json:
        print(f"results written to {args.json}")
    return 0


def cmd_visualize(args) -> int:
    """Dataset mode: metrics, ranked lists, FED/DPM pictures and an HTML report for a checkpoint
    on its test set. Image mode (--images): FED stripe scores / DPM mask statistics."""
    import torch


    ex = _extractor_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = args.scale or max(1.0, 128.0 / ex.img_size[0])  # thumbnails at least 128 px high
    thumb = tuple(int(round(v * scale)) for v in ex.img_size)
    written: List[Path] = []
    if args.images:
        paths = list(args.images)
        res = ex.extract(paths, camids=[0] * len(paths) if ex.uses_cameras else None)
        names = [Path(p).name for p in paths]
        if "part_scores" in res:
            written.append(draw_occlusion_scores(paths, res["part_scores"], out / "fed_occlusion_scores.png",
                                                 labels=names, thumb_size=thumb))
        if "mask" in res:
            written.append(draw_mask_statistics(res["mask"], out / "dpm_mask_statistics.png"))
        if not written:
            raise OccReIDError(
                f"a {ex.method} model has no per-image occlusion output to draw for --images; for ranked lists "
                "run visualize on a dataset (--data-root) or use `occreid search`"
            )
        for p in written:
            print(f"wrote {p}")
        return 0


    ov = [f"data.root={args.data_root}"] if args.data_root else []
    cfg = load_config(None, ov + list(args.overrides or []), base=ex.config)
    with synthocc_generation(args.generate_data):  # evaluating generates SynthOcc only when asked
        _, test_ds = build_datasets(cfg)
    query, gallery = list(test_ds.query), list(test_ds.gallery)
    recs = query + gallery
    feats = ex.extract([r.path for r in recs], camids=[r.camid for r in recs] if ex.uses_cameras else None)
    q, g = split_query_gallery(feats, len(query))
    for part, rr in ((q, query), (g, gallery)):
        part["pids"] = torch.tensor([r.pid for r in rr])
        part["camids"] = torch.tensor([r.camid for r in rr])
    groups = [getattr(r, "occlusion", None) for r in query]
    t = cfg["test"]
    metrics = evaluate_features(q, g, distance=ex.retrieval_distance, feat_norm=True, metric=t["metric"],
                                max_rank=int(t["max_rank"]), query_groups=groups)
    metrics.update(dataset=test_ds.name, method=ex.method, checkpoint=str(args.weights))
    atomic_write_text(json.dumps(metrics, indent=2), out / "metrics.json")

    # ranked lists of a few queries per occlusion type (same id + same camera removed, as evaluated)
    chosen = pick_queries(query, args.per_type, args.num_queries)
    index = GalleryIndex(g["feat"], [r.path for r in gallery], pids=g["pids"], camids=g["camids"],
                         retrieval=ex.retrieval)
    sel = {k: v[chosen] for k, v in q.items() if k in ("feat", "mask")}
    ranking = index.search(sel, k=len(gallery), backend="exact").indices.numpy()  # [n, G], best first
    ranked, matches = top_matches(ranking, q["pids"].numpy()[chosen], q["camids"].numpy()[chosen],
                                  g["pids"].numpy(), g["camids"].numpy(), args.topk)
    short = {"holistic": "hol"}
    labels = [f"{query[i].pid} {short.get(groups[i], groups[i] or '')}".strip() for i in chosen]
    sections = []
    rl = draw_ranked_lists([query[i].path for i in chosen], [r.path for r in gallery], ranked, matches,
                           out / "ranked_lists.png", query_labels=labels, thumb_size=thumb)
    written.append(rl)
    sections.append(("Ranked lists (green = same person, red = another person)", [(rl, f"top-{args.topk} of {len(chosen)} queries")]))
    extra = None
    if "part_scores" in q:
        png = draw_occlusion_scores([query[i].path for i in chosen], q["part_scores"][chosen],
                                    out / "fed_occlusion_scores.png", labels=labels, thumb_size=thumb)
        written.append(png)
        sections.append(("FED occlusion scores per stripe", [(png, "OEM score per horizontal stripe (1 = visible)")]))
    if "mask" in q:
        png = draw_mask_statistics(q["mask"], out / "dpm_mask_statistics.png", groups=groups)
        written.append(png)
        extra = {"dpm_query_masks": mask_statistics(q["mask"], groups)}
        sections.append(("DPM mask statistics (queries)", [(png, "HMG channel masks of the query images")]))
    log = Path(args.weights).with_name("log.jsonl")
    if log.is_file():
        png = plot_training_log(log, out / "curves.png")
        written.append(png)
        sections.insert(0, ("Training curves", [(png, str(log))]))
    info = {"checkpoint": str(args.weights), "method": ex.method, "backbone": ex.backbone,
            "feature dim": ex.feature_dim, "input (H x W)": f"{ex.img_size[0]} x {ex.img_size[1]}",
            "fingerprint": ex.fingerprint, "dataset": f"{test_ds.name}: {len(query)} queries, {len(gallery)} gallery images",
            "distance": ex.retrieval["distance"]}
    report = write_report(out / "report.html", title=f"occreid: {ex.method} on {test_ds.name}", info=info,
                          metrics=metrics, sections=sections, extra=extra)
    _print_metrics(metrics)
    for p in written + [out / "metrics.json", report]:
        print(f"wrote {p}")
    return 0


def cmd_export(args) -> int:
    fmt = args.format or {".onnx": "onnx", ".safetensors": "safetensors"}.get(Path(args.out).suffix)
    if fmt is None:
        raise OccReIDError(f"cannot tell the export format from {args.out!r}: name it *.onnx or *.safetensors, or pass --format")
    _check_out_file(args.out, "--out")
    if fmt == "onnx":  # before the model is loaded: the extras this export needs
        require_module("onnx", "onnx", "exporting to ONNX")
        if args.check:
            require_module("onnxruntime", "onnx", "--check of an ONNX export")
    ex = _extractor_from_args(args)
    if fmt == "safetensors":
        path = export_safetensors(ex, args.out)
        print(f"weights: {path}\nsidecar: {path.with_suffix('.json')}\nfeature dim {ex.feature_dim}, input "
              f"{ex.img_size[0]}x{ex.img_size[1]} RGB, model {ex.fingerprint}")
        if args.check:
            back = load_export(path, device=ex.device)
            x = ex.preprocess([__import__("numpy").zeros((*ex.img_size, 3), dtype="uint8")] * 2)
            a, b = ex.forward_batch(x), back.forward_batch(x)
            print(f"check: reloaded fingerprint {back.fingerprint}, max |feat difference| "
                  f"{float((a['feat'] - b['feat']).abs().max()):.2e}")
        return 0
    path = export_onnx(ex, args.out, opset=args.opset)
    print(f"onnx: {path}\nsidecar: {path.with_name(path.name + '.json')}\ninput images [B, 3, {ex.img_size[0]}, "
          f"{ex.img_size[1]}] RGB float in [0, 1]" + (", cam_ids [B] int64" if ex.uses_cameras else ""))
    if args.check:
        diffs = check_onnx(path, ex, batch_size=args.check_batch)
        print("check (onnxruntime vs PyTorch, batch of "
              f"{args.check_batch}): " + ", ".join(f"max |{k} difference| {v:.2e}" for k, v in diffs.items()))
    return 0


_VISUALIZE_FILES = """\
Ranked lists, FED/DPM occlusion pictures and an HTML report for a checkpoint on its test set.

files written into --out:
  metrics.json              the evaluation (the numbers of `occreid test`)
  ranked_lists.png          top-k gallery images of a few queries per occlusion type
  fed_occlusion_scores.png  FED models: OEM score per horizontal stripe of those queries
  dpm_mask_statistics.png   DPM models: statistics of the queries' HMG channel masks
  curves.png                training curves, when log.jsonl lies next to --weights
  report_cmc.png            the CMC curve (drawn for the report)
  report.html               all of the above in one self-contained page
with --images, only fed_occlusion_scores.png (FED) or dpm_mask_statistics.png (DPM) of those images."""


def _add_use_commands(sub) -> None:
    def common(c, weights_required: bool = True):
        c.add_argument("--weights", required=weights_required,
                       help="occreid checkpoint (model_final.pth) or .safetensors export"
                            + ("" if weights_required else " (default: the weights the index was built with)"))
        c.add_argument("--config", help="for an official TransReID/FED/DPM checkpoint: the config of its architecture "
                       "(e.g. occluded_duke/dpm.yaml; default: none, occreid checkpoints carry their own)")
        c.add_argument("--memory", help=_MEMORY_HELP)
        c.add_argument("--device", help=_DEVICE_HELP)
        c.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default: %(default)s)")
        c.add_argument("--workers", type=_count, default=0,
                       help="image decoding worker processes (default: %(default)s = in this process)")

    i = sub.add_parser("index", help="extract features of a folder of images into a gallery index",
                       description="Extract the features of every image under a folder into one index file. "
                                   "Unreadable images are skipped with a warning (--strict: stop instead).")
    common(i)
    i.add_argument("--images", required=True, help="folder of gallery images (searched recursively)")
    i.add_argument("--out", required=True, help="index file to write")
    i.add_argument("--faiss", help="also build a faiss index: flat (exact), ivf, ivfpq, hnsw or a factory string "
                                   "(needs occreid[faiss]; default: none, exact search)")
    i.add_argument("--nlist", type=_positive_int, help="IVF cells (default: 4*sqrt(N))")
    i.add_argument("--nprobe", type=_positive_int, help="IVF cells visited per query (default: 32)")
    i.add_argument("--strict", action="store_true", help="stop at the first unreadable image (default: skip it with a warning)")
    i.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="search a gallery index with query images",
                       description="Search a gallery index with query images; works from any folder (the index "
                                   "resolves its paths against its own location).")
    common(s, weights_required=False)
    s.add_argument("--index", required=True, help="index written by `occreid index`")
    s.add_argument("--query", required=True, nargs="+", help="query image(s)")
    s.add_argument("--topk", type=_positive_int, default=10, help="results per query (default: %(default)s)")
    s.add_argument("--backend", default="auto", choices=["auto", "exact", "faiss"],
                   help="auto: the index's faiss index when it has one, else exact (default: %(default)s)")
    s.add_argument("--nprobe", type=_positive_int, help="IVF cells visited per query (default: the index's)")
    s.add_argument("--query-camid", type=_count, default=0,
                   help="camera id of the queries, SIE models only (default: %(default)s)")
    s.add_argument("--json", help="also write the results as JSON to this file ('-' = print JSON only)")
    s.set_defaults(func=cmd_search)

    v = sub.add_parser("visualize", help="ranked lists, occlusion pictures, CMC curve and an HTML report",
                       description=_VISUALIZE_FILES, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(v)
    v.add_argument("--out", required=True, help="output folder (the files are listed above)")
    v.add_argument("--data-root", help="dataset folder (default: data.root of the checkpoint's config)")
    v.add_argument("--generate-data", action="store_true",
                   help="generate SynthOcc (the config's preset and seed) when its folder is absent or empty "
                        "(default: a missing dataset is an error)")
    v.add_argument("--images", nargs="+", help="draw FED stripe scores / DPM mask statistics for these images only")
    v.add_argument("--num-queries", type=_positive_int, default=9, help="queries in the ranked-list picture (default: %(default)s)")
    v.add_argument("--per-type", type=_positive_int, default=3,
                   help="queries per occlusion type, holistic/npo/ntp (default: %(default)s)")
    v.add_argument("--topk", type=_positive_int, default=8, help="gallery images per ranked list (default: %(default)s)")
    v.add_argument("--scale", type=float, help="thumbnail size relative to the model input (default: >= 128 px high)")
    v.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for the test data, e.g. data.test_name=occluded_reid")
    v.set_defaults(func=cmd_visualize)

    e = sub.add_parser("export", help="export to ONNX or safetensors (+ JSON sidecar)",
                       description="Export to ONNX (needs occreid[onnx]) or safetensors, each with a JSON sidecar.")
    common(e)
    e.add_argument("--out", required=True, help="reid.onnx or reid.safetensors")
    e.add_argument("--format", choices=["onnx", "safetensors"], help="default: from the --out suffix")
    e.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default: %(default)s)")
    e.add_argument("--check", action="store_true",
                   help="compare the export's output with PyTorch's (ONNX: with onnxruntime, occreid[onnx])")
    e.add_argument("--check-batch", type=_positive_int, default=8, help="images in the --check batch (default: %(default)s)")
    e.set_defaults(func=cmd_export)


def _one_line(exc: BaseException) -> str:
    """The message of an error as one line. An error raised in a DataLoader worker arrives
    wrapped in torch's "Caught ... in DataLoader worker process" text with a traceback; its
    last line holds the original message."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") and ": " in last else last
    return " ".join(msg.split())


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except OccReIDError as exc:
        print(f"occreid: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("occreid: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
