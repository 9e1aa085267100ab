"""FED losses (Sec. 3.3): memory contrastive loss (Eq. 9), MSE on occlusion scores (Eq. 2),
ID losses (Eq. 8), and their assembly with the official weights or the paper's Eq. 10.

Official assembly (fed-official.md §4.2), the default ``weights="official"``::

    total = MSE(s_clean, 1) + MSE(s_occ, mask)                         # weight 1 each
          + 1/2 [CE(oem_clean) + CE(oem_occ)] + 1/2 [CE(fdm_clean) + CE(fdm_occ)]
          + 1/2 [CE(global_clean) + CE(global_occ)]                     # 1/2 per logit
          + 1.0 C(oem_clean) + 0.3 C(oem_occ) + 0.5 C(fdm_clean) + 0.5 C(fdm_occ)

The paper's Eq. 10 (``weights="paper"``) puts 1/2 on every term; ``"no_mse"`` is the
official set without the two MSE terms (the paper's DukeMTMC-reID recipe, whose training set
is full of real occlusions). There is no triplet loss in FED.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "FED_LOSS_WEIGHTS",
    "memory_contrastive_loss",
    "fed_losses",
]

#: Per-term weights. Keys are the loss-dict keys of :func:`fed_losses`; ID weights are per logit.
FED_LOSS_WEIGHTS: Dict[str, Dict[str, float]] = {
    "official": {
        "mse_clean": 1.0, "mse_occ": 1.0,
        "id_oem_clean": 0.5, "id_oem_occ": 0.5,
        "id_fdm_clean": 0.5, "id_fdm_occ": 0.5,
        "id_global_clean": 0.5, "id_global_occ": 0.5,
        "mc_oem_clean": 1.0, "mc_oem_occ": 0.3,
        "mc_fdm_clean": 0.5, "mc_fdm_occ": 0.5,
    },
    "paper": {
        "mse_clean": 0.5, "mse_occ": 0.5,
        "id_oem_clean": 0.5, "id_oem_occ": 0.5,
        "id_fdm_clean": 0.5, "id_fdm_occ": 0.5,
        "id_global_clean": 0.5, "id_global_occ": 0.5,
        "mc_oem_clean": 0.5, "mc_oem_occ": 0.5,
        "mc_fdm_clean": 0.5, "mc_fdm_occ": 0.5,
    },
}
FED_LOSS_WEIGHTS["no_mse"] = {**FED_LOSS_WEIGHTS["official"], "mse_clean": 0.0, "mse_occ": 0.0}


def memory_contrastive_loss(
    x: torch.Tensor,
    pids: torch.Tensor,
    centres: torch.Tensor,
    temperature: float = 0.05,
    eps: float = 1e-6,
    *,
    centres_normalized: bool = False,
) -> torch.Tensor:
    """Memory contrastive loss (Eq. 9 with cosine similarity), official numerics.

    ``l_bj = cos(x_b, c_j) / temperature``; ``p_b = exp(l_b,y) / (sum_j exp(l_bj) + eps)``;
    loss = ``mean_b -log(p_b + eps)``. Both ``eps`` terms are the official ones. The
    gradient flows into ``x`` only (the centres are constants). Computed in float32 with
    log-sum-exp, so no overflow under fp16/bf16 autocast (the official code exponentiates
    without max subtraction).

    Args:
        x: ``[B, F]`` features (raw; normalised here).
        pids: ``[B]`` identity = row of ``centres``.
        centres: ``[C, F]`` memory centres (raw or normalised; normalised here, detached).
        centres_normalized: ``centres`` is already ``F.normalize(centres.float(), dim=1)``
            (e.g. shared by several calls on one bank): used as it is.
    """
    if x.dim() != 2 or centres.dim() != 2 or x.shape[1] != centres.shape[1]:
        raise ValueError(
            f"expected x [B, F] and centres [C, F] of the same width, got {tuple(x.shape)} "
            f"and {tuple(centres.shape)}"
        )
    xn = F.normalize(x.float(), dim=1)
    cn = centres.detach().float() if centres_normalized else F.normalize(centres.detach().float(), dim=1)
    logits = xn @ cn.t() / temperature  # [B, C]
    log_eps = math.log(eps)
    # log(sum_j exp(l_j) + eps) = logsumexp([l_1 .. l_C, log eps])
    denom = torch.logsumexp(
        torch.cat([logits, logits.new_full((logits.shape[0], 1), log_eps)], dim=1), dim=1
    )
    log_p = logits.gather(1, pids.view(-1, 1).to(logits.device)).squeeze(1) - denom
    # -log(p + eps) = -logaddexp(log p, log eps)
    return -torch.logaddexp(log_p, log_p.new_tensor(log_eps)).mean()


def fed_losses(
    outputs: Mapping[str, torch.Tensor],
    pids: torch.Tensor,
    centres_oem: torch.Tensor,
    centres_fdm: Optional[torch.Tensor] = None,
    *,
    weights: Union[str, Mapping[str, float]] = "official",
    temperature: float = 0.05,
) -> Dict[str, torch.Tensor]:
    """All FED loss terms, already weighted; the total is ``sum(result.values())``.

    Args:
        outputs: the FED training-forward dict with ``logits_{oem,fdm,global}_{clean,occ}``
            ``[B, C]``, ``feat_{oem,fdm}_{clean,occ}`` ``[B, F]``, ``scores_{clean,occ}``
            ``[B, P]`` and ``mask`` ``[B, P]``.
        pids: ``[B]`` training identity labels.
        centres_oem: memory for the OEM features ``[C, F]`` (the bank before this step's update).
        centres_fdm: memory for the FDM features; ``None`` = the same bank (official: the two
            memory objects share one tensor).
        weights: ``"official"``, ``"paper"``, ``"no_mse"`` or a dict over the keys of
            :data:`FED_LOSS_WEIGHTS` (missing keys are errors).

    Ablations (:class:`occreid.methods.fed.FED` with ``oem=False`` / ``fdm=False``) leave out
    ``scores_*`` / the ``*_fdm_*`` outputs; their terms are then absent from the result, as
    are terms of weight 0.

    Returns:
        dict with keys ``mse_clean``, ``mse_occ`` (MSE of the scores against ones and
        against the stripe mask), ``id_{oem,fdm,global}_{clean,occ}`` (plain
        cross-entropy, no label smoothing) and ``mc_{oem,fdm}_{clean,occ}`` (memory
        contrastive, tau = ``temperature``), each multiplied by its weight.
    """
    if isinstance(weights, str):
        if weights not in FED_LOSS_WEIGHTS:
            raise ValueError(f"unknown FED loss weights {weights!r}; expected one of {list(FED_LOSS_WEIGHTS)}")
        w = FED_LOSS_WEIGHTS[weights]
    else:
        w = dict(weights)
        missing = set(FED_LOSS_WEIGHTS["official"]) - set(w)
        if missing:
            raise ValueError(f"FED loss weights miss the keys {sorted(missing)}")
    if centres_fdm is None:
        centres_fdm = centres_oem
    pids = pids.to(outputs["logits_oem_clean"].device).long()

    raw: Dict[str, torch.Tensor] = {}
    if "scores_clean" in outputs:
        s_clean, s_occ = outputs["scores_clean"].float(), outputs["scores_occ"].float()
        raw["mse_clean"] = F.mse_loss(s_clean, torch.ones_like(s_clean))
        raw["mse_occ"] = F.mse_loss(s_occ, outputs["mask"].to(s_occ))
    centres = {"oem": centres_oem, "fdm": centres_fdm}
    if "logits_fdm_clean" not in outputs:  # FED without the FDM (ablation)
        del centres["fdm"]
    for head in (*centres, "global"):
        for branch in ("clean", "occ"):
            raw[f"id_{head}_{branch}"] = F.cross_entropy(outputs[f"logits_{head}_{branch}"].float(), pids)
    normalized: Dict[int, torch.Tensor] = {}  # each bank normalised once (official: one shared bank)
    for head, bank in centres.items():
        if id(bank) not in normalized:
            normalized[id(bank)] = F.normalize(bank.detach().float(), dim=1)
        for branch in ("clean", "occ"):
            raw[f"mc_{head}_{branch}"] = memory_contrastive_loss(
                outputs[f"feat_{head}_{branch}"], pids, normalized[id(bank)], temperature, centres_normalized=True
            )
    return {k: v * w[k] for k, v in raw.items() if w[k]}
