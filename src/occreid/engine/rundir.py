"""Run folders: what an output folder holds, and keeping a finished or partial run from being
overwritten by a new one.

``occreid train`` (and ``occreid demo``) call :func:`prepare_run_dir` before any work:

* an absent or empty folder, or one without run files, is used as it is;
* a folder holding a run (``last.pth``, ``model_final.pth``, ``log.jsonl``, ``metrics.json`` or
  ``config.yaml``) is refused unless the run is continued (``--resume``) or ``--overwrite`` is
  given, which **moves** the whole folder aside to ``<folder>.old-<n>`` (never deletes it);
* :func:`trim_log` makes ``log.jsonl`` start fresh in a new run and drops records of epochs a
  resumed run repeats.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

from ..utils.io import OccReIDError, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["RUN_FILES", "RunState", "run_state", "prepare_run_dir", "trim_log"]

#: Files a training run writes into its output folder; any of them marks the folder as a run.
RUN_FILES = ("model_final.pth", "last.pth", "log.jsonl", "metrics.json", "config.yaml")


@dataclass
class RunState:
    """What an output folder holds.

    Attributes:
        kind: ``"none"`` (absent, empty or no run files), ``"finished"`` (``model_final.pth``),
            ``"partial"`` (``last.pth`` without ``model_final.pth``), ``"evaluated"``
            (``metrics.json`` without checkpoints) or ``"started"`` (only ``config.yaml`` /
            ``log.jsonl``: a run stopped before its first checkpoint, nothing worth keeping).
        files: the run files present.
        epochs: epochs recorded in ``log.jsonl`` (the last epoch number), if any.
    """

    folder: Path
    kind: str
    files: List[str] = field(default_factory=list)
    epochs: Optional[int] = None

    def describe(self) -> str:
        done = f" after {self.epochs} epoch{'s' if self.epochs != 1 else ''}" if self.epochs else ""
        if self.kind == "finished":
            return f"a finished training run (model_final.pth{done})"
        if self.kind == "partial":
            return f"an unfinished training run (last.pth{done})"
        if self.kind == "evaluated":
            return "evaluation results (metrics.json)"
        return f"a training run that stopped before its first checkpoint ({', '.join(self.files)})"


def _last_epoch(log: Path) -> Optional[int]:
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["epoch"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def run_state(folder: Union[str, os.PathLike]) -> RunState:
    """Inspect ``folder`` (it need not exist)."""
    f = Path(folder)
    if not f.is_dir():
        if f.exists():
            raise OccReIDError(f"output folder {f} is a file; pass --output with a folder path")
        return RunState(f, "none")
    files = [name for name in RUN_FILES if (f / name).exists()]
    if not files:
        return RunState(f, "none")
    epochs = _last_epoch(f / "log.jsonl")
    if "model_final.pth" in files:
        kind = "finished"
    elif "last.pth" in files:
        kind = "partial"
    elif "metrics.json" in files:
        kind = "evaluated"
    else:
        kind = "started"
    return RunState(f, kind, files, epochs)


def _aside_name(folder: Path) -> Path:
    base = folder if folder.name not in ("", ".", "..") else folder.resolve()
    n = 1
    while True:
        cand = base.with_name(f"{base.name}.old-{n}")
        if not cand.exists():
            return cand
        n += 1


def prepare_run_dir(
    folder: Union[str, os.PathLike],
    *,
    resume: bool = False,
    overwrite: bool = False,
    command: str = "train",
) -> Optional[Path]:
    """Make sure a new run cannot destroy an old one in ``folder``.

    Args:
        resume: the run continues the one in ``folder`` (``--resume``): allowed when it has one.
        overwrite: move an existing run aside to ``<folder>.old-<n>`` first.
        command: the command named in messages (``train`` offers ``--resume``).

    Returns the folder the old run was moved to, or None.

    Raises :class:`OccReIDError` when ``folder`` holds a run and neither ``resume`` nor
    ``overwrite`` is given, or both are.
    """
    f = Path(folder)
    if resume and overwrite:
        raise OccReIDError("--resume continues the run in the output folder and --overwrite moves it aside: pass one of them")
    state = run_state(f)
    if resume or state.kind == "none":
        return None
    if state.kind == "started" and not overwrite:
        logger.info("%s holds %s; starting a new run there", f, state.describe())
        return None
    if not overwrite:
        if command != "train":
            resume_hint = ""
        elif state.kind == "partial":
            resume_hint = " Pass --resume to continue it,"
        else:
            resume_hint = " (--resume continues unfinished runs only.) Pass"
        raise OccReIDError(
            f"output folder {f} already holds {state.describe()}, which a new run would overwrite.{resume_hint or ' Pass'}"
            f" --output with another folder for a new run, or --overwrite to move the old run aside to "
            f"{_aside_name(f)} and start afresh"
        )
    here = Path.cwd().resolve()
    target = f.resolve()
    if target == here or target in here.parents:
        raise OccReIDError(
            f"--overwrite would move the output folder {f}, which holds the current folder, aside; "
            "pass --output with another folder"
        )
    aside = _aside_name(f)
    try:
        os.replace(f, aside)  # the folder as named (a symbolic link is moved, not its target)
    except OSError as exc:
        raise OccReIDError(f"--overwrite: cannot move {f} aside to {aside} ({exc.strerror or exc}); "
                           "move it yourself or pass another --output") from None
    logger.warning("moved the previous run in %s aside to %s", f, aside)
    return aside


def trim_log(log: Union[str, os.PathLike], start_epoch: int) -> None:
    """Keep only the ``log.jsonl`` records of epochs before ``start_epoch``: a new run
    (``start_epoch`` 1) starts an empty log, a resumed run drops the records of epochs it
    repeats (e.g. one logged just before the process was killed, without its checkpoint)."""
    p = Path(log)
    if not p.is_file():
        return
    kept = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["epoch"]) < start_epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    if start_epoch <= 1:
        kept = []
    atomic_write_text("".join(k + "\n" for k in kept), p)
