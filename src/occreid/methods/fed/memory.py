"""Identity-centre memory bank of FED (Sec. 3.2 "Memory Bank", Eq. 3), DDP-correct.

The bank ``M`` holds one centre per training identity, ``[C, F]`` (F = parts x width).

* **Initialisation** (as coded): average of the features of each identity over one pass
  of the training set (:meth:`IdentityMemory.init_from_features`; under
  ``torch.distributed`` the per-identity sums and counts are all-reduced, so every
  process gets the same centres from its own shard of the data).
* **Update**, after each training step, from the *raw, unnormalised* features (the
  official code never renormalises the centres; the losses and the memory search use an
  L2-normalised copy):

  - ``"sequential"`` (official default): the official code runs, for each sample in
    batch order, ``c_y <- m c_y + (1 - m) x``. For an identity whose samples in the batch
    are ``x_1 .. x_n`` (batch order) this telescopes to the closed form

        c_n = m^n c_0 + (1 - m) * sum_{j=1..n} m^(n-j) x_j

    which :func:`sequential_momentum_update` evaluates for all identities at once
    (one ``index_add_``, no loop over samples).
  - ``"mean"`` (the paper's Eq. 3): ``c_k <- m c_k + (1 - m) mean_{i in B_k} x_i``.

  ``m = 1`` leaves the bank unchanged (the official occluded branch). With several
  processes every process all-gathers the features and labels of all processes (in rank
  order, which is the order of the global PK batch when the sampler splits it into
  contiguous shares) and applies the same update, so the banks stay identical.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...utils import OccReIDError
from ...utils import distributed as du

__all__ = [
    "UPDATE_RULES",
    "IdentityMemory",
    "sequential_momentum_update",
    "mean_momentum_update",
]

logger = logging.getLogger(__name__)

#: Accepted values of ``update_rule``.
UPDATE_RULES = ("sequential", "mean")


def _check_update_args(centres: torch.Tensor, x: torch.Tensor, pids: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != centres.shape[1]:
        raise ValueError(
            f"memory update expects features [B, {centres.shape[1]}], got {tuple(x.shape)}"
        )
    if pids.shape != (x.shape[0],):
        raise ValueError(f"memory update expects pids [{x.shape[0]}], got {tuple(pids.shape)}")
    if pids.numel() and bool(((pids < 0) | (pids >= centres.shape[0])).any()):  # one host sync
        raise ValueError(
            f"identity labels must lie in [0, {centres.shape[0] - 1}] (the memory has "
            f"{centres.shape[0]} centres); got range [{int(pids.min())}, {int(pids.max())}]"
        )


def sequential_momentum_update(
    centres: torch.Tensor, x: torch.Tensor, pids: torch.Tensor, momentum: float
) -> torch.Tensor:
    """Closed form of the official per-sample loop ``for (x, y): c_y <- m c_y + (1-m) x``.

    Args:
        centres: ``[C, F]`` current centres (not modified).
        x: ``[B, F]`` raw features in batch order.
        pids: ``[B]`` identity of each feature (row of ``centres``).
        momentum: ``m``; weight of the old centre per step.

    Returns:
        New centres ``[C, F]``: ``m^{n_k} c_k + (1-m) sum_j m^{n_k - 1 - r_j} x_j`` where
        ``n_k`` is the number of samples of identity ``k`` and ``r_j`` the 0-based rank of
        sample ``j`` among them in batch order.
    """
    _check_update_args(centres, x, pids)
    C = centres.shape[0]
    pids = pids.to(device=centres.device, dtype=torch.long)
    x = x.to(device=centres.device, dtype=centres.dtype)
    B = pids.numel()
    counts = torch.bincount(pids, minlength=C)  # [C]
    # Rank of each sample among the samples of its identity, in batch order.
    order = torch.sort(pids, stable=True).indices  # groups ids, keeps batch order inside
    first = torch.cumsum(counts, 0) - counts  # [C] start of each id in sorted order
    rank_sorted = torch.arange(B, device=pids.device) - first[pids[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    exponent = (counts[pids] - 1 - rank).to(torch.float64)  # [B]
    m = torch.tensor(float(momentum), dtype=torch.float64, device=centres.device)
    weight = ((1.0 - m) * m.pow(exponent)).to(centres.dtype)  # [B]
    keep = m.pow(counts.to(torch.float64)).to(centres.dtype)  # [C]; 1 for absent ids
    out = centres * keep[:, None]
    out.index_add_(0, pids, x * weight[:, None])
    return out


def mean_momentum_update(
    centres: torch.Tensor, x: torch.Tensor, pids: torch.Tensor, momentum: float
) -> torch.Tensor:
    """The paper's Eq. 3: ``c_k <- m c_k + (1-m) mean(x_i : y_i = k)`` for identities in the batch."""
    _check_update_args(centres, x, pids)
    C = centres.shape[0]
    pids = pids.to(device=centres.device, dtype=torch.long)
    x = x.to(device=centres.device, dtype=centres.dtype)
    counts = torch.bincount(pids, minlength=C)
    sums = torch.zeros_like(centres).index_add_(0, pids, x)
    present = counts > 0
    mean = sums / counts.clamp_min(1).to(centres.dtype)[:, None]
    updated = momentum * centres + (1.0 - momentum) * mean
    return torch.where(present[:, None], updated, centres)


class IdentityMemory(nn.Module):
    """A bank of ``num_ids`` identity centres of width ``dim`` (buffer ``features``).

    Args:
        num_ids: number of training identities ``C`` (row ``k`` = relabelled id ``k``).
        dim: feature width ``F``.
        momentum: ``m`` of the update (official 0.2: the new sample gets weight 0.8).
        update_rule: ``"sequential"`` (official, closed form) or ``"mean"`` (paper Eq. 3).

    The bank is a buffer, so it is saved in the model's ``state_dict`` and moved by
    ``.to()``; it never requires grad.
    """

    def __init__(
        self, num_ids: int, dim: int, *, momentum: float = 0.2, update_rule: str = "sequential"
    ) -> None:
        super().__init__()
        if update_rule not in UPDATE_RULES:
            raise ValueError(f"unknown memory update rule {update_rule!r}; expected one of {UPDATE_RULES}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"memory momentum must lie in [0, 1], got {momentum}")
        self.num_ids = int(num_ids)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.update_rule = update_rule
        self.register_buffer("features", torch.zeros(self.num_ids, self.dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return (
            f"num_ids={self.num_ids}, dim={self.dim}, momentum={self.momentum}, "
            f"update_rule={self.update_rule!r}"
        )

    def normalized(self) -> torch.Tensor:
        """L2-normalised centres ``[C, F]`` (a new tensor, detached)."""
        return F.normalize(self.features.detach(), dim=1)

    def check_initialized(self) -> None:
        if not bool(self.initialized):
            raise OccReIDError(
                "FED's identity memory is not initialised. Run the memory-initialisation pass "
                "over the training set first (model.init_memory_from_loader(loader) or "
                "model.init_memory(features, pids)); the trainer does this before epoch 1."
            )

    @torch.no_grad()
    def init_from_features(self, features: torch.Tensor, pids: torch.Tensor) -> None:
        """Set every centre to the mean feature of its identity.

        ``features`` ``[N, F]`` and ``pids`` ``[N]`` may be this process's shard only: with
        an initialised process group the sums and counts are all-reduced, so all processes
        end with the same bank. Every identity must have at least one feature overall.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got {tuple(features.shape)}")
        if pids.shape != (features.shape[0],):
            raise ValueError(f"expected pids [{features.shape[0]}], got {tuple(pids.shape)}")
        dev = self.features.device
        pids = pids.to(device=dev, dtype=torch.long)
        if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= self.num_ids):
            raise OccReIDError(
                f"memory initialisation got identity labels outside [0, {self.num_ids - 1}] "
                f"(range {int(pids.min())}..{int(pids.max())}); the model was built for "
                f"{self.num_ids} training identities: relabel the training pids to 0..C-1."
            )
        # Sums in float64 so the centre does not depend on the number of processes' rounding.
        sums = torch.zeros(self.num_ids, self.dim, dtype=torch.float64, device=dev)
        sums.index_add_(0, pids, features.to(device=dev, dtype=torch.float64))
        counts = torch.bincount(pids, minlength=self.num_ids).to(torch.float64)
        if du.is_dist():
            du.all_reduce_sum_(sums)
            du.all_reduce_sum_(counts)
        missing = torch.nonzero(counts == 0).flatten()
        if missing.numel():
            shown = ", ".join(str(int(i)) for i in missing[:10])
            raise OccReIDError(
                f"memory initialisation saw no image of {missing.numel()} identities "
                f"(e.g. {shown}); iterate over the whole training set (no sampler that drops ids)."
            )
        self.features.copy_((sums / counts[:, None]).to(self.features.dtype))
        self.initialized.fill_(True)
        logger.info("FED memory initialised: %d identity centres of width %d", self.num_ids, self.dim)

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        pids: torch.Tensor,
        momentum: Optional[float] = None,
        *,
        gather: bool = True,
    ) -> None:
        """Momentum-update the centres with raw features ``x`` ``[B, F]`` of identities ``pids``.

        With ``gather`` (default) and an initialised process group, the features of all
        processes are all-gathered first so every process applies the same update.
        ``momentum`` overrides the module's (``1.0`` is an exact no-op).
        """
        m = self.momentum if momentum is None else float(momentum)
        x = x.detach()
        pids = pids.detach().to(device=x.device, dtype=torch.long)
        if gather:
            x, pids = du.all_gather_cat(x), du.all_gather_cat(pids)
        if m == 1.0:
            return
        rule = sequential_momentum_update if self.update_rule == "sequential" else mean_momentum_update
        self.features.copy_(rule(self.features, x, pids, m))

    def copy_from(self, other: "IdentityMemory") -> None:
        """Copy centres and the initialised flag from another bank of the same shape."""
        with torch.no_grad():
            self.features.copy_(other.features)
            self.initialized.copy_(other.initialized)

