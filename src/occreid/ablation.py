"""The SynthOcc ablations of FED (paper Tables 3-4) and DPM (paper Tables 3-4), one command each.

``occreid ablate fed-components`` (or ``fed-k``, ``fed-switches``, ``dpm-components``, ``dpm-losses``) trains
every row of the table with ``occreid train`` on the SynthOcc demo preset (the demo recipe of
``configs/synthocc/*_demo.yaml``; one row = one config plus overrides), evaluates it, and
writes ``results.json`` and ``results.md`` (overall and per occlusion type) in the output
folder. Headline rows (the baseline and the full method) run with every ``--seeds`` seed and
are reported as mean ± sample standard deviation; the other rows run with the first seed
only and are marked as single-seed.

Runs live in ``<output>/runs/<run>/seed<N>`` and are shared between tables (FED's K = 8 row
is the full-FED run of the components table): a finished run (``model_final.pth`` present)
is not trained again, an interrupted one resumes from its ``last.pth``. Rows are
independent processes, so ``--jobs 2`` runs two at a time (each with
``threads / jobs`` threads).

DPM rows are evaluated twice: with the official test (pre-BNNeck feature, each query's mask
applied to the gallery) during training, and afterwards with the same query-mask distance on
the post-BNNeck feature (``model.neck_feat=after``), see docs/results.md.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .config import load_config
from .configs import config_path
from .engine.build import build_datasets, method_spec, model_from_checkpoint
from .engine.checkpoint import load_checkpoint
from .engine.trainer import evaluate_model
from .utils import OccReIDError, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["Row", "Table", "TABLES", "RECIPES", "get_table", "table_dir", "plan_runs", "run_table", "summarise",
           "format_markdown"]

#: Demo recipes a table can run with: ``current`` (``configs/synthocc/*_demo.yaml``) or ``v1``
#: (``configs/synthocc/v1/``, the recipe of the first round of tables in docs/results.md).
RECIPES = ("current", "v1")


@dataclass(frozen=True)
class Row:
    """One table row: ``label`` as in the paper, trained as ``run`` (a folder name shared by
    rows that are the same experiment) from ``config`` with ``overrides``."""

    label: str
    run: str
    config: str
    overrides: Tuple[str, ...] = ()
    headline: bool = False


@dataclass(frozen=True)
class Table:
    title: str
    paper: str
    rows: Tuple[Row, ...]
    notes: str = ""
    post_bn_eval: bool = False  # DPM: also evaluate the masked distance on the post-BN feature


_BASE = "synthocc/baseline_demo"
_FED = "synthocc/fed_demo"
_DPM = "synthocc/dpm_demo"
_JITTER = "data.color_jitter=[0.1,0.1,0.1,0.0]"  # FED's common transform (fed_demo.yaml)
_NO_HR = "model.kwargs.hmg_blocks=[12]"  # the last block only (scaled to the model's depth)
_NO_HEM = "model.kwargs.beta=0.0"
_NO_MASK = "model.kwargs.masked_branch=false"

TABLES: Dict[str, Table] = {
    "fed-components": Table(
        title="FED: each component (paper Table 3)",
        paper="Occluded-Duke R1/mAP: 59.1/49.1, 60.3/53.1, 65.4/53.5, 66.5/55.4, 67.1/55.9, 68.1/56.4",
        rows=(
            Row("0 baseline (ViT, ID + triplet)", "baseline", _BASE, headline=True),
            Row("1 + RE", "baseline_re", _BASE, ("data.re_prob=0.5",)),
            Row("2 + NPO aug", "baseline_npo", _BASE, ("data.npo=true", _JITTER)),
            Row("3 + NPO aug + OEM", "fed_no_fdm", _FED, ("model.kwargs.fdm=false",)),
            Row("4 + NPO aug + FDM", "fed_no_oem", _FED, ("model.kwargs.oem=false",)),
            Row("5 FED (NPO aug + OEM + FDM)", "fed", _FED, headline=True),
        ),
        notes=(
            "Rows 0-2 are the ViT baseline (ID + triplet on the cls token); row 2 trains it on "
            "both views of each NPO sample. Rows 3-5 are the FED model (part features, ID and "
            "memory-contrastive losses, no triplet): row 3 without the memory search and FDM, "
            "row 4 without the OEM (scores fixed to 1, no MSE); the memory bank and its "
            "contrastive loss on the OEM features stay in both."
        ),
    ),
    "fed-k": Table(
        title="FED: the number K of searched centres (paper Table 4)",
        paper="Occluded-Duke R1/mAP: K=2 67.4/55.8, K=4 67.7/56.2, K=6 67.3/56.2, K=8 68.1/56.4",
        rows=(
            Row("K = 2", "fed_k2", _FED, ("model.kwargs.num_neighbours=2",)),
            Row("K = 4", "fed_k4", _FED, ("model.kwargs.num_neighbours=4",)),
            Row("K = 6", "fed_k6", _FED, ("model.kwargs.num_neighbours=6",)),
            Row("K = 8 (default)", "fed", _FED, headline=True),
        ),
    ),
    "fed-switches": Table(
        title="FED: official-vs-paper switches that may matter at this scale (investigation)",
        paper="no paper table; the switches are documented in docs/methods/fed.md",
        rows=(
            Row("FED (official switches)", "fed", _FED, headline=True),
            Row("global_token=cls (paper)", "fed_cls", _FED, ("model.kwargs.global_token=cls",)),
            Row("fdm_head_merge=per_sample (paper)", "fed_per_sample", _FED, ("model.kwargs.fdm_head_merge=per_sample",)),
        ),
        notes=(
            "The official 'global' branch classifies the first patch token (a corner patch), "
            "not the cls token; the official FDM mixes attention heads across the batch."
        ),
    ),
    "dpm-components": Table(
        title="DPM: each component (paper Table 3)",
        paper="Occluded-Duke R1/mAP: 64.8/57.8, 70.1/59.9, 71.0/61.0, 71.4/61.8",
        rows=(
            Row("baseline (softmax + triplet)", "dpm_baseline", _DPM, (_NO_MASK, _NO_HEM), headline=True),
            Row("+ DPM (mask from the last block)", "dpm_no_hr_no_hem", _DPM, (_NO_HR, _NO_HEM)),
            Row("+ DPM + HR (blocks 2, 4, 10, 12 of 12)", "dpm_no_hem", _DPM, (_NO_HEM,)),
            Row("+ DPM + HR + HEM (full DPM)", "dpm", _DPM, headline=True),
        ),
        notes=(
            "All rows use DPM's code path and loss (soft-margin triplet, no label smoothing); "
            "the baseline row has no HMG and no masked branch (plain cosine retrieval). HMG "
            "blocks are scaled to the depth-4 demo model: (2, 4, 10, 12) of 12 -> (1, 2, 3, 4), "
            "the last block alone -> (4,)."
        ),
        post_bn_eval=True,
    ),
    "dpm-losses": Table(
        title="DPM: softmax (S) or angular margin (A) in the two branches (paper Table 4)",
        paper=(
            "Occluded-Duke R1/mAP: baseline S 64.8/57.8, baseline A 68.6/58.5, DPM S S 64.6/57.3, "
            "DPM A A 68.3/57.7, DPM S A 70.1/59.9"
        ),
        rows=(
            Row("baseline, Cls S", "dpm_baseline", _DPM, (_NO_MASK, _NO_HEM), headline=True),
            Row("baseline, Cls A", "dpm_baseline_arc", _DPM, (_NO_MASK, _NO_HEM, "model.kwargs.cls_margin=0.5")),
            Row("DPM, Cls S, Mask-Cls S", "dpm_ss", _DPM, (_NO_HR, _NO_HEM, "model.kwargs.arc_margin=0.0")),
            Row("DPM, Cls A, Mask-Cls A", "dpm_aa", _DPM, (_NO_HR, _NO_HEM, "model.kwargs.cls_margin=0.5")),
            Row("DPM, Cls S, Mask-Cls A (default)", "dpm_no_hr_no_hem", _DPM, (_NO_HR, _NO_HEM)),
        ),
        notes=(
            "As in the paper, the DPM rows of this table have no hierarchy and no HEM (its "
            "'DPM S A' row equals Table 3's '+DPM'). S = softmax: plain f·Wᵀ for Cls, scaled "
            "cosine (s = 30, m = 0) for Mask-Cls; A = ArcFace, s = 30, m = 0.5."
        ),
        post_bn_eval=True,
    ),
}

#: The DPM tables' "official test" column is the official pre-BNNeck test, also where the demo
#: recipe evaluates after the BNNeck (configs/synthocc/dpm_demo.yaml says why); the post-BN
#: column is the re-evaluation of each run.
_PRE_BN = "model.neck_feat=before"
for _name in ("dpm-components", "dpm-losses"):
    TABLES[_name] = replace(
        TABLES[_name], rows=tuple(replace(r, overrides=(_PRE_BN, *r.overrides)) for r in TABLES[_name].rows)
    )

#: Columns of the result tables: (header, metric path in metrics.json).
COLUMNS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("mAP all", ("mAP",)),
    ("R1 all", ("rank1",)),
    ("mAP holistic", ("by_occlusion", "holistic", "mAP")),
    ("mAP NPO", ("by_occlusion", "npo", "mAP")),
    ("mAP NTP", ("by_occlusion", "ntp", "mAP")),
    ("mAP occluded", ("by_occlusion", "occluded", "mAP")),
    ("R1 occluded", ("by_occlusion", "occluded", "rank1")),
)


def get_table(name: str, recipe: str = "current") -> Table:
    """Ablation ``name`` with the demo ``recipe`` (:data:`RECIPES`); the ``v1`` rows read their
    configs from ``synthocc/v1/`` and train into runs named ``v1_<run>``."""
    if name not in TABLES:
        raise OccReIDError(f"unknown ablation {name!r}; choose one of {', '.join(TABLES)}")
    if recipe not in RECIPES:
        raise OccReIDError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    table = TABLES[name]
    if recipe == "current":
        return table
    rows = tuple(
        replace(r, run=f"{recipe}_{r.run}", config=r.config.replace("synthocc/", f"synthocc/{recipe}/", 1))
        for r in table.rows
    )
    return replace(table, title=f"{table.title}, recipe {recipe}", rows=rows)


def table_dir(output: os.PathLike, name: str, recipe: str = "current") -> Path:
    """Where ``run_table`` writes the results of table ``name`` (``<name>_v1`` for recipe v1)."""
    return Path(output) / (name if recipe == "current" else f"{name}_{recipe}")


def plan_runs(table: Table, seeds: Sequence[int]) -> List[Tuple[Row, int]]:
    """Every (row, seed) to train: all ``seeds`` for headline rows, the first for the others;
    a run shared by two rows appears once."""
    if not seeds:
        raise OccReIDError("give at least one seed")
    plan, seen = [], set()
    for row in table.rows:
        for seed in seeds if row.headline else seeds[:1]:
            if (row.run, seed) not in seen:
                seen.add((row.run, seed))
                plan.append((row, seed))
    return plan


def run_dir(output: Path, row: Row, seed: int) -> Path:
    return Path(output) / "runs" / row.run / f"seed{seed}"


def train_command(row: Row, seed: int, folder: Path, data_root: Optional[str], extra: Sequence[str]) -> List[str]:
    cmd = [sys.executable, "-m", "occreid.cli", "train", "--config", str(config_path(row.config)),
           "--output", str(folder), "--device", "cpu"]
    if data_root:
        cmd += ["--data-root", data_root]
    if (folder / "last.pth").is_file():
        cmd.append("--resume")
    return cmd + [f"solver.seed={seed}", "progress=false", *row.overrides, *extra]


def _post_bn_metrics(folder: Path) -> Dict[str, Any]:
    """Re-evaluate a finished DPM run with the query-mask distance on the post-BNNeck feature."""
    ckpt = load_checkpoint(folder / "model_final.pth")
    cfg = load_config(None, ["model.neck_feat=after"], base=ckpt["config"])
    model = model_from_checkpoint(ckpt, cfg=cfg)
    if method_spec(cfg).retrieval(model)["distance"] == "cosine":
        raise OccReIDError(f"{folder}: not a checkpoint with a query-mask distance (DPM with its masked branch)")
    _, test_ds = build_datasets(cfg)
    return evaluate_model(model, cfg, test_ds, torch.device("cpu"), None)


def run_table(
    name: str,
    output: os.PathLike,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    jobs: int = 1,
    threads: Optional[int] = None,
    data_root: Optional[str] = None,
    extra_overrides: Sequence[str] = (),
    dry_run: bool = False,
    recipe: str = "current",
) -> Dict[str, Any]:
    """Train (or reuse) every run of ablation ``name`` with the demo ``recipe`` and write its
    results; returns them."""
    table = get_table(name, recipe)
    output = Path(output)
    plan = plan_runs(table, list(seeds))
    jobs = max(1, int(jobs))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    pending = [(row, seed) for row, seed in plan if not (run_dir(output, row, seed) / "model_final.pth").is_file()]
    logger.info("%s: %d runs, %d to train (%d at a time, %d threads each)", name, len(plan), len(pending), jobs, threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if dry_run:
        for row, seed in pending:
            print(" ".join(train_command(row, seed, run_dir(output, row, seed), data_root, extra_overrides)))
        return {}
    if pending:  # generate SynthOcc once here, not in two runs at the same time
        row = pending[0][0]
        ov = list(row.overrides) + list(extra_overrides) + ([f"data.root={data_root}"] if data_root else [])
        build_datasets(load_config(config_path(row.config), ov))
    running: List[Tuple[subprocess.Popen, Row, int, float, Any]] = []
    failed: List[str] = []
    queue = list(pending)
    while queue or running:
        while queue and len(running) < jobs:
            row, seed = queue.pop(0)
            folder = run_dir(output, row, seed)
            folder.mkdir(parents=True, exist_ok=True)
            cmd = train_command(row, seed, folder, data_root, extra_overrides)
            log = open(folder / "ablation.log", "a")
            logger.info("start %s seed %d: %s", row.run, seed, " ".join(cmd[3:]))
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), row, seed, time.time(), log))
        time.sleep(2)
        for item in list(running):
            proc, row, seed, start, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            wall = time.time() - start
            folder = run_dir(output, row, seed)
            if proc.returncode != 0:
                failed.append(f"{row.run} seed {seed} (exit {proc.returncode}; see {folder / 'ablation.log'})")
                logger.error("failed: %s", failed[-1])
                continue
            atomic_write_text(json.dumps({"wall_s": wall, "threads": threads, "jobs": jobs}), folder / "wall.json")
            logger.info("done %s seed %d in %.0f s", row.run, seed, wall)
    if failed:
        raise OccReIDError("ablation runs failed: " + "; ".join(failed))
    if table.post_bn_eval:
        for row, seed in plan:
            folder = run_dir(output, row, seed)
            target = folder / "metrics_post_bn.json"
            if not target.is_file() and _NO_MASK not in row.overrides:  # re-evaluated with model.neck_feat=after
                atomic_write_text(json.dumps(_post_bn_metrics(folder), indent=2), target)
    result = summarise(table, output, list(seeds))
    where = table_dir(output, name, recipe)
    where.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=2), where / "results.json")
    atomic_write_text(format_markdown(result), where / "results.md")
    return result


def _lookup(metrics: Dict[str, Any], path: Sequence[str]) -> float:
    value: Any = metrics
    for key in path:
        value = value[key]
    return 100.0 * float(value)


def _stats(values: List[float]) -> Dict[str, Any]:
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.mean(values), "std": std, "min": min(values), "max": max(values), "values": values}


def summarise(table: Table, output: Path, seeds: Sequence[int]) -> Dict[str, Any]:
    """Mean/std over seeds per row and column, from the runs' metrics files."""
    rows = []
    for row in table.rows:
        row_seeds = list(seeds) if row.headline else list(seeds[:1])
        evals: Dict[str, List[Dict[str, Any]]] = {"official": [], "post_bn": []}
        walls = []
        for seed in row_seeds:
            folder = run_dir(output, row, seed)
            evals["official"].append(json.loads((folder / "metrics.json").read_text()))
            if (folder / "metrics_post_bn.json").is_file():
                evals["post_bn"].append(json.loads((folder / "metrics_post_bn.json").read_text()))
            if (folder / "wall.json").is_file():
                walls.append(json.loads((folder / "wall.json").read_text())["wall_s"])
        entry = {
            "label": row.label, "run": row.run, "config": row.config, "overrides": list(row.overrides),
            "seeds": row_seeds, "wall_s": walls,
        }
        for kind, metrics in evals.items():
            if metrics:
                entry[kind] = {h: _stats([_lookup(m, p) for m in metrics]) for h, p in COLUMNS}
        rows.append(entry)
    return {"title": table.title, "paper": table.paper, "notes": table.notes, "rows": rows}


def _cell(stat: Dict[str, Any]) -> str:
    if stat["std"] is None:
        return f"{stat['mean']:.1f}"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def format_markdown(result: Dict[str, Any]) -> str:
    """The result tables as Markdown (one per evaluation kind present)."""
    lines = [f"### {result['title']}", ""]
    kinds = [("official", "official test"), ("post_bn", "query mask on the post-BNNeck feature")]
    present = [(k, t) for k, t in kinds if any(k in r for r in result["rows"])]
    for kind, title in present:
        if len(present) > 1:
            lines += [f"**{title}**", ""]
        lines.append("| row | seeds | " + " | ".join(h for h, _ in COLUMNS) + " |")
        lines.append("|---|---|" + "---|" * len(COLUMNS))
        for r in result["rows"]:
            stats = r.get(kind) or r["official"]  # rows without a masked branch: plain cosine
            seeds = ",".join(str(s) for s in r["seeds"]) + ("" if len(r["seeds"]) > 1 else " (single seed)")
            cells = [_cell(stats[h]) for h, _ in COLUMNS]
            lines.append(f"| {r['label']} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    if any("post_bn" in r for r in result["rows"]) and any("post_bn" not in r for r in result["rows"]):
        lines += ["Rows without a masked branch use plain cosine in both tables.", ""]
    lines += [f"Paper: {result['paper']}.", ""]
    if result["notes"]:
        lines += [result["notes"], ""]
    return "\n".join(lines)
