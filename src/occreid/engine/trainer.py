"""The training loop: PK batches, SGD + warm-up cosine, AMP, DDP, checkpoints, evaluation, logs.

Everything method-specific comes from the method's spec (:mod:`occreid.methods`): the
optimisers (:meth:`~occreid.methods.MethodSpec.param_sets`), the work before the first epoch
(FED's memory initialisation) and the iteration, run by the engine's one
:class:`~occreid.engine.step.TrainStep`.

Determinism: at the start of every epoch the Python, NumPy and torch generators are reseeded
from ``(seed, epoch)`` and the PK sampler is a pure function of ``(seed, epoch)``, so a run
resumed from an epoch checkpoint continues exactly as the uninterrupted run (on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..config import dump_config
from ..evaluation.extract import evaluate_features, extract_features, split_query_gallery
from ..utils.cpu_memory import tune_cpu_allocator
from ..utils import distributed as du
from ..utils.device import autocast_context, resolve_amp, resolve_device
from ..utils.io import OccReIDError, atomic_write_text
from .build import (
    build_datasets,
    build_model,
    build_test_loader,
    build_train_loader,
    method_spec,
    model_meta,
)
from .checkpoint import load_checkpoint, restore_training_state, save_checkpoint, unwrap
from .rundir import trim_log
from .curves import plot_training_log
from .step import TrainStep, build_method_optimizers

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank) * 104_729) % (2**31 - 1)


class Progress:
    """A minimal progress line that only draws on a terminal."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.n = 0
        self.t0 = time.time()

    def update(self, info: str = "") -> None:
        self.n += 1
        if self.enabled:
            rate = self.n / max(time.time() - self.t0, 1e-9)
            sys.stderr.write(f"\r{self.desc} {self.n}/{self.total} [{rate:.2f} it/s] {info}   ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class Trainer:
    def __init__(self, cfg: Dict[str, Any], *, resume: bool = False) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg["device"])
        du.init_from_env(self.device)
        self.rank, self.world = du.get_rank(), du.get_world_size()
        self.output_dir = Path(cfg["output_dir"])
        if du.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
        s = cfg["solver"]
        self.seed = int(s["seed"])
        seed_everything(self.seed)
        self.amp = resolve_amp(s["amp"], self.device)

        self.train_ds, self.test_ds = build_datasets(cfg)
        self.num_classes = self.train_ds.num_train_pids
        self.num_cameras = self.train_ds.num_cams  # sizes the SIE table (cameras of all splits)
        self.train_loader, self.sampler = build_train_loader(cfg, self.train_ds, self.seed)
        self.query = list(self.test_ds.query)
        self.gallery = list(self.test_ds.gallery)

        self.spec = method_spec(cfg)
        model = build_model(cfg, self.num_classes, self.num_cameras).to(self.device)
        self.model_meta = model_meta(cfg, self.num_classes, self.num_cameras, getattr(model, "feature_dim", 0))
        self.optimizers, self.schedulers = build_method_optimizers(self.spec, model, s)
        # fp16: dynamic loss scaling; starting at 2**10 rather than 2**16 skips fewer early steps
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**10, enabled=self.amp == torch.float16)

        self.model: nn.Module = model
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.spec.ddp_find_unused_parameters,
            )
        if s["compile"]:
            self.model = torch.compile(self.model)
        self.step = TrainStep(
            self.spec,
            model,
            self.optimizers,
            forward=self.model,
            device=self.device,
            amp=self.amp,
            scaler=self.scaler,
            grad_clip=s["grad_clip"],
            accum_steps=int(s["accum_steps"]),
        )

        self.start_epoch = 1
        self.last_metrics: Optional[Dict[str, Any]] = None
        if resume:
            ckpt_path = self.output_dir / "last.pth"
            if not ckpt_path.is_file():
                raise OccReIDError(f"--resume: no checkpoint at {ckpt_path}; nothing to resume")
            ckpt = load_checkpoint(ckpt_path, map_location=self.device)
            done = restore_training_state(ckpt, self.model, self.optimizers, self.schedulers, self.scaler)
            self.start_epoch = done + 1
            self.last_metrics = ckpt.get("metrics")
            logger.info("resumed from %s (epoch %d done)", ckpt_path, done)

        prog = cfg["progress"]
        self.show_progress = du.is_main() and (prog == "on" or (prog == "auto" and sys.stderr.isatty()))
        self.tb = None
        if cfg["tensorboard"] and du.is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.output_dir / "tb"))
            except ImportError:
                logger.warning("tensorboard is not installed; pip install tensorboard to enable it")

    # ------------------------------------------------------------------ helpers
    @property
    def unwrapped(self) -> nn.Module:
        return unwrap(self.model)

    def autocast(self):
        return autocast_context(self.device, self.amp)

    def to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def train_eval_loader(self):
        """A loader over the training images with the test transform (FED's memory init)."""
        return build_test_loader(self.cfg, self.train_ds.train)

    # ------------------------------------------------------------------ loop
    def train(self) -> Optional[Dict[str, Any]]:
        s = self.cfg["solver"]
        max_epochs = int(s["max_epochs"])
        m = self.unwrapped
        if self.start_epoch > max_epochs and (self.output_dir / "model_final.pth").is_file():  # else: killed before it
            logger.info("training already finished (%d epochs)", max_epochs)
            return self.last_metrics
        if self.device.type == "cpu":
            tune_cpu_allocator()  # fewer page faults per step (occreid.utils.cpu_memory)
        self.spec.on_train_start(m, self.train_eval_loader, self.device)
        if du.is_main():
            atomic_write_text(dump_config(self.cfg), self.output_dir / "config.yaml")
            trim_log(self.output_dir / "log.jsonl", self.start_epoch)  # a new run starts a fresh log
            logger.info(
                "training %s on %s: %d ids, %d images, %d cameras; %d epochs, batch %d, device %s, amp %s, world %d",
                self.spec.name, self.train_ds.name, self.num_classes, len(self.train_ds.train),
                self.num_cameras, max_epochs, s["ims_per_batch"], self.device,
                self.amp or "fp32", self.world,
            )
        metrics = self.last_metrics
        for epoch in range(self.start_epoch, max_epochs + 1):
            seed_everything(epoch_seed(self.seed, epoch, self.rank))
            for sch in self.schedulers:
                sch.step(epoch)
            self.sampler.set_epoch(epoch)
            self.model.train()
            sums: Dict[str, float] = {}
            n_iter = 0
            t0 = time.time()
            bar = Progress(len(self.train_loader), f"epoch {epoch}/{max_epochs}", self.show_progress)
            per_iter = [sch for sch in self.schedulers if getattr(sch, "per_iteration", False)]
            n_batches = max(1, len(self.train_loader))
            for batch in self.train_loader:
                for sch in per_iter:  # solver.lr_schedule: iteration
                    sch.step(epoch, n_iter / n_batches)
                batch = self.to_device(batch)
                stats = self.step(batch)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_iter += 1
                bar.update(f"loss {stats.get('loss', float('nan')):.3f}")
            bar.close()
            dt = time.time() - t0
            if n_iter == 0:
                raise OccReIDError("the training loader produced no batch: too few identities for the batch size")
            record: Dict[str, Any] = {
                "epoch": epoch,
                "lr": self.schedulers[0].get_last_lr()[0],
                **{k: v / n_iter for k, v in sums.items()},
                "iters": n_iter,
                "epoch_time_s": dt,
                "images_per_s": n_iter * int(s["ims_per_batch"]) / max(dt, 1e-9),
            }
            if epoch % int(s["eval_period"]) == 0 or epoch == max_epochs:
                metrics = self.evaluate(epoch)
                record["metrics"] = {k: metrics[k] for k in ("rank1", "rank5", "mAP", "mINP") if k in metrics}
                if "by_occlusion" in metrics:
                    record["metrics"]["by_occlusion"] = {
                        g: {"mAP": v["mAP"], "rank1": v["rank1"]} for g, v in metrics["by_occlusion"].items()
                    }
            if du.is_main():
                self._log(record)
                if epoch % int(s["checkpoint_period"]) == 0 or epoch == max_epochs:
                    save_checkpoint(
                        self.output_dir / "last.pth",
                        self.model,
                        epoch=epoch,
                        config=self.cfg,
                        model_meta=self.model_meta,
                        optimizers=self.optimizers,
                        schedulers=self.schedulers,
                        scaler=self.scaler,
                        metrics=metrics,
                    )
            du.barrier()
        if du.is_main():
            save_checkpoint(
                self.output_dir / "model_final.pth",
                self.model,
                epoch=max_epochs,
                config=self.cfg,
                model_meta=self.model_meta,
                metrics=metrics,
                include_rng=False,
            )
            self._plot_curves()
            if self.tb is not None:
                self.tb.close()
        return metrics

    def _log(self, record: Dict[str, Any]) -> None:
        losses = " ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float) and k not in ("lr", "epoch_time_s", "images_per_s"))
        msg = f"epoch {record['epoch']}: lr {record['lr']:.2e} {losses} ({record['images_per_s']:.1f} img/s)"
        if "metrics" in record:
            mm = record["metrics"]
            msg += f" | mAP {mm['mAP']:.1%} R1 {mm['rank1']:.1%}"
        logger.info(msg)
        with open(self.output_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(f"train/{k}", v, record["epoch"])
            for k, v in (record.get("metrics") or {}).items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"eval/{k}", v, record["epoch"])

    def _plot_curves(self) -> None:
        try:
            plot_training_log(self.output_dir / "log.jsonl", self.output_dir / "curves.png")
        except Exception as exc:  # plotting must never lose a finished run
            logger.warning("could not draw training curves: %s", exc)

    # ------------------------------------------------------------------ eval
    def evaluate(self, epoch: int) -> Dict[str, Any]:
        metrics = evaluate_model(
            self.unwrapped, self.cfg, self.test_ds, self.device, self.amp, self.query, self.gallery
        )
        metrics.update(
            dataset=self.test_ds.name,
            method=self.spec.name,
            epoch=epoch,
            checkpoint=str(self.output_dir / "last.pth"),
        )
        if du.is_main():
            atomic_write_text(json.dumps(metrics, indent=2), self.output_dir / "metrics.json")
        return metrics


def evaluate_model(model, cfg, test_ds, device, amp, query=None, gallery=None) -> Dict[str, Any]:
    """Extract query+gallery features (sharded under DDP) and compute metrics on every rank."""
    query = list(test_ds.query if query is None else query)
    gallery = list(test_ds.gallery if gallery is None else gallery)
    t = cfg["test"]
    loader = build_test_loader(cfg, query + gallery)
    feats = extract_features(model, loader, device, amp, use_cameras=bool(cfg["model"]["sie_camera"]))
    nq = len(query)
    q, g = split_query_gallery(feats, nq)
    groups = [getattr(r, "occlusion", None) for r in query]
    metrics = evaluate_features(
        q,
        g,
        distance=lambda qq, gg: method_spec(cfg).retrieval_distance(unwrap(model), qq, gg),
        feat_norm=bool(t["feat_norm"]),
        metric=t["metric"],
        max_rank=int(t["max_rank"]),
        re_ranking=bool(t["re_ranking"]),
        rerank_params=(t["rerank_k1"], t["rerank_k2"], t["rerank_lambda"]),
        query_groups=groups,
    )
    metrics["num_query"] = nq
    metrics["num_gallery"] = len(gallery)
    return metrics
