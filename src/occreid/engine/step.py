"""The one training step: a batch in, losses and statistics out.

:class:`TrainStep` is what ``occreid train`` runs for every method, what ``bench/train_step.py``
times and what the trajectory tests compare with the official code. It needs no dataset: build
the model, take the optimisers from :func:`build_method_optimizers` and call the step on a
batch ``{"images", "pids", "camids"}``.

One iteration is the spec's passes (:meth:`occreid.methods.MethodSpec.passes`); each pass
zeroes the gradients of its optimisers, runs the spec's training forward and loss under
autocast, backpropagates the (scaled) sum, clips (optionally) and steps its optimisers, then
updates the GradScaler. After the last pass the spec's ``after_step`` runs (FED's memory
update). With ``accum_steps = k`` (single-pass methods) the batch is split into ``k``
contiguous shares (whole identities, as the PK sampler lays them out) whose gradients add
up: exactly what ``k`` DDP processes compute for the same global batch.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..methods import MethodSpec
from ..utils import OccReIDError
from ..utils.device import autocast_context
from .solver import WarmupCosineLR, build_optimizers

__all__ = ["TrainStep", "build_method_optimizers"]


def build_method_optimizers(
    spec: MethodSpec, model: nn.Module, solver: Mapping[str, Any]
) -> Tuple[List[torch.optim.Optimizer], List[WarmupCosineLR]]:
    """The method's optimisers (one per :class:`~occreid.methods.ParamSet`) and schedulers."""
    return build_optimizers(spec.param_sets(model, solver), dict(solver))


class TrainStep:
    """One training iteration of ``spec``'s method.

    Args:
        spec: the method's spec.
        model: the (unwrapped) method model.
        optimizers: as from :func:`build_method_optimizers` (index = ParamSet index).
        forward: what to call for the forward pass (the DDP / compiled wrapper); default ``model``.
        device, amp: autocast device and dtype (``None`` = fp32).
        scaler: an optional ``torch.amp.GradScaler`` (fp16).
        grad_clip: optional max gradient norm, per optimiser.
        accum_steps: gradient accumulation shares (single-pass methods only).
    """

    def __init__(
        self,
        spec: MethodSpec,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        forward: Optional[Callable[..., Any]] = None,
        device: Optional[torch.device] = None,
        amp: Optional[torch.dtype] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        grad_clip: Optional[float] = None,
        accum_steps: int = 1,
    ) -> None:
        self.spec = spec
        self.model = model
        self.optimizers = list(optimizers)
        self.forward = forward if forward is not None else model
        self.device = device if device is not None else next(model.parameters()).device
        self.amp = amp
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.grad_clip = float(grad_clip) if grad_clip else None
        self.accum_steps = int(accum_steps)
        self.passes: Tuple[Tuple[int, ...], ...] = tuple(tuple(p) for p in spec.passes(model))
        used = sorted({i for p in self.passes for i in p})
        if used != list(range(len(self.optimizers))):
            raise OccReIDError(
                f"method {spec.name!r}: its passes use optimisers {used} but {len(self.optimizers)} were built"
            )
        if self.accum_steps < 1:
            raise OccReIDError(f"solver.accum_steps must be >= 1, got {accum_steps}")
        if self.accum_steps > 1 and not spec.supports_accumulation(model):
            raise OccReIDError(f"solver.accum_steps > 1 is not supported by method {spec.name!r}")

    def autocast(self):
        return autocast_context(self.device, self.amp) if self.amp is not None else contextlib.nullcontext()

    def _backward(self, total: torch.Tensor) -> None:
        (self.scaler.scale(total) if self.scaler is not None else total).backward()

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        """(Unscale,) clip this optimiser's gradients by their own norm, step. Clipping per
        optimiser keeps a non-finite gradient of one parameter set (which makes the scaler skip
        that optimiser) from turning the other set's gradients into NaN."""
        if self.grad_clip:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def _shares(self, batch: Mapping[str, Any]) -> List[Mapping[str, Any]]:
        k = self.accum_steps
        if k == 1:
            return [batch]
        n = batch["images"].shape[0]
        out = []
        for i in range(k):
            sl = slice(i * n // k, (i + 1) * n // k)
            out.append({key: (v[sl] if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v) for key, v in batch.items()})
        return out

    def _check_finite(self, total: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> None:
        """Raise before the backward pass on a non-finite CPU loss (free there). On an
        accelerator the check needs a host sync, so it is deferred to the one transfer of
        the statistics at the end of the step (:meth:`__call__`)."""
        if total.device.type == "cpu" and not bool(torch.isfinite(total)):
            self._raise_non_finite(float(total.detach()), {k: float(v.detach()) for k, v in losses.items()})

    def _raise_non_finite(self, total: float, terms: Mapping[str, float]) -> None:
        raise FloatingPointError(f"non-finite {self.spec.name} loss {total} ({dict(terms)})")

    def __call__(self, batch: Mapping[str, Any]) -> Dict[str, float]:
        """Run one iteration on ``batch`` (tensors already on the device); returns the loss
        terms of the last pass (averaged over accumulation shares), ``loss`` (their sum) and
        the spec's statistics, as floats (one host transfer for all of them).

        Gradients of an optimiser that no later pass of the iteration steps are released
        after its step (the next iteration zeroes them before use), so they do not occupy
        memory during the later passes.
        """
        spec, model = self.spec, self.model
        sums: Dict[str, torch.Tensor] = {}
        deferred: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = []  # accelerator finiteness checks
        outputs: Any = None
        share: Mapping[str, Any] = batch
        for p, opt_ids in enumerate(self.passes):
            opts = [self.optimizers[i] for i in opt_ids]
            for o in opts:
                o.zero_grad(set_to_none=True)
            sums, outputs = {}, None
            shares = self._shares(batch)
            n = len(shares)
            for share in shares:
                with self.autocast():
                    outputs = spec.forward_train(self.forward, model, share, p)
                    losses = spec.loss(model, outputs, share)
                total = sum(losses.values())
                self._check_finite(total, losses)
                if total.device.type != "cpu":
                    deferred.append((total.detach(), {k: v.detach() for k, v in losses.items()}))
                self._backward(total / n if n > 1 else total)
                terms = {**{k: v.detach() for k, v in losses.items()}, "loss": total.detach()}
                for k, v in terms.items():
                    sums[k] = v if n == 1 else sums.get(k, 0.0) + v / n
                del losses, total, terms
            for o in opts:
                self._step(o)
            if self.scaler is not None:
                self.scaler.update()
            if p + 1 < len(self.passes):
                later = {i for q in self.passes[p + 1:] for i in q}
                for i in opt_ids:
                    if i not in later:
                        self.optimizers[i].zero_grad(set_to_none=True)
        spec.after_step(model, outputs, share)
        stats: Dict[str, Any] = dict(sums)
        stats.update(spec.step_stats(model, outputs, share))
        return self._to_floats(stats, deferred)

    def _to_floats(
        self, stats: Mapping[str, Any], deferred: Sequence[Tuple[torch.Tensor, Mapping[str, torch.Tensor]]]
    ) -> Dict[str, float]:
        """``stats`` (tensors or numbers) as floats, with a single device-to-host transfer that
        also carries the deferred finiteness checks (raised here, after the step)."""
        tensors = [(k, v) for k, v in stats.items() if isinstance(v, torch.Tensor)]
        flat: List[torch.Tensor] = [v.detach().reshape(()) for _, v in tensors]
        for total, terms in deferred:
            flat.append(total.reshape(()))
            flat.extend(t.reshape(()) for t in terms.values())
        values: List[float] = []
        if flat:
            dtype = torch.float64 if flat[0].device.type != "mps" else torch.float32
            values = torch.stack([t.to(dtype) for t in flat]).tolist()
        out = {k: float(v) for k, v in stats.items() if not isinstance(v, torch.Tensor)}
        out.update((k, values[i]) for i, (k, _) in enumerate(tensors))
        pos = len(tensors)
        for total, terms in deferred:
            if not math.isfinite(values[pos]):
                self._raise_non_finite(values[pos], dict(zip(terms, values[pos + 1: pos + 1 + len(terms)])))
            pos += 1 + len(terms)
        return {k: out[k] for k in stats}
