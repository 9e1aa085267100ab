"""FED: Feature Erasing and Diffusion Network (Wang et al., CVPR 2022), as officially coded.

Reads against the paper (Sec. 3, Fig. 2-3) and ``specs/fed-official.md``; shapes for a batch
of ``B`` images, ``P`` parts (4), part width ``D`` (768 for ViT-B), ``F = P * D``, ``C``
training identities, ``K`` searched centres (8):

* **NPO augmentation** (data side, :mod:`occreid.data.npo`): the training batch is the
  7-channel ``[B, 7, H, W]`` tensor ``cat(x, x', d)``; the stripe mask ``[B, P]`` is derived
  from channel 6 on the batch (:func:`occreid.data.npo.stripe_mask`).
* **Part pooling**: patch tokens ``[B, N, D]`` -> ``P`` horizontal parts ``[B, P, D]``
  aligned with the mask stripes (:func:`part_pool`).
* **OEM** (Eq. 1): per part ``s_i = sigmoid(W_rg LN(W_cp p_i))`` with biases, ``p'_i = s_i p_i``
  (:class:`OEM`); MSE against the masks (Eq. 2).
* **BNNeck per part** (code only): ``f' = BN(p')`` flattened to ``[B, F]`` (one
  ``BatchNorm1d(F)`` is exactly ``P`` per-part ``BatchNorm1d(D)``).
* **Memory search**: the ``K`` nearest identity centres by cosine, own identity excluded
  (:func:`memory_search`); memory bank in :mod:`occreid.models.memory` (Eq. 3).
* **FDM** (Eq. 4-7): cross-attention from the single ``F``-d query ``f'`` to the ``K``
  centres, then ``f'_d = FFN2(FFN1(f_d) * s + f')`` (:class:`FDM`).
* **Losses** (Eq. 2, 8, 9, 10): :mod:`occreid.losses.fed_losses`.
* **Inference**: the retrieval feature is ``f'`` (OEM-weighted, BNNeck'd concatenation of
  the parts, ``[B, F]``); FDM and memory are not used.

Switches (default = official code; the other value = paper), see ``docs/methods/fed.md``:

=======================  ======================  =======================================
switch                   official (default)      paper / alternative
=======================  ======================  =======================================
``global_token``         ``"patch1"``            ``"cls"``
``fdm_head_merge``       ``"official"`` (heads   ``"per_sample"`` (Eq. 4-6)
                         mixed across the batch)
``attn_scale``           ``"official"`` (D/H)    ``"standard"`` ((F/H)^-0.5)
``ffn_style``            ``"official"`` pre-LN   ``"paper"`` post-LN FFN with residual
                         GEGLU, no residual
``memory_update``        ``"sequential"``        ``"mean"`` (Eq. 3)
``memory_banks``         ``"shared"`` (one bank  ``"separate"`` (OEM bank + FDM bank)
                         written by both)
``memory_init``          ``"no_oem"``            ``"oem"`` (centres of f' after OEM)
``fdm_bn``               ``"shared"``            ``"separate"`` (own BNNeck for FDM)
``loss_weights``         ``"official"``          ``"paper"`` (1/2 everywhere, Eq. 10),
                                                 ``"no_mse"`` (DukeMTMC-reID recipe)
``mask_rule``            ``"official"``          ``"paper"`` (> 3/4 covered)
``part_pooling``         ``"rows"`` (= official  ``"flat"`` (official flatten-and-pool,
                         when gy % P == 0)       misaligned when gy % P != 0)
=======================  ======================  =======================================

Ablation switches (Table 3): ``oem=False`` drops the OEM (scores fixed to 1, no MSE terms);
``fdm=False`` drops the memory search and FDM (no FDM logits, features or losses). The
memory bank and its contrastive loss on the OEM features stay in both cases.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.npo import MASK_RULES, stripe_mask
from ...losses.fed_losses import FED_LOSS_WEIGHTS, fed_losses
from ...models.heads import BNNeck, Classifier
from ...utils import OccReIDError
from ..spec import check_choice
from .memory import UPDATE_RULES, IdentityMemory

logger = logging.getLogger(__name__)

__all__ = [
    "part_pool",
    "OEM",
    "memory_search",
    "FDMCrossAttention",
    "GEGLUFeedForward",
    "PostNormFeedForward",
    "FDM",
    "FED",
    "convert_official_state_dict",
]

ATTN_SCALES = ("official", "standard")
HEAD_MERGES = ("official", "per_sample")
FFN_STYLES = ("official", "paper")
GLOBAL_TOKENS = ("patch1", "cls")
MEMORY_BANKS = ("shared", "separate")
MEMORY_INITS = ("no_oem", "oem")
FDM_BNS = ("shared", "separate")
PART_POOLINGS = ("rows", "flat")


# --------------------------------------------------------------------------------------------
# Part pooling
# --------------------------------------------------------------------------------------------
def part_pool(
    patch_tokens: Tensor, grid_size: Sequence[int], num_parts: int = 4, mode: str = "rows"
) -> Tensor:
    """Average patch tokens ``[B, N, D]`` (row-major ``gy x gx`` grid) into ``[B, P, D]`` parts.

    ``"rows"``: part ``i`` averages the grid rows ``floor(i gy / P) .. ceil((i+1) gy / P)``
    (adaptive pooling over rows), so parts line up with the image stripes of the mask for
    any grid. ``"flat"``: the official ``AdaptiveAvgPool1d(P)`` over the flattened token
    sequence. Both are identical when ``gy % P == 0`` (ViT-B/16 at 256x128: 16 rows, 4 per part).
    """
    check_choice("part_pooling", mode, PART_POOLINGS)
    B, N, D = patch_tokens.shape
    gy, gx = int(grid_size[0]), int(grid_size[1])
    if gy * gx != N:
        raise ValueError(f"{N} patch tokens do not form the {gy}x{gx} grid")
    if mode == "flat":
        return F.adaptive_avg_pool1d(patch_tokens.transpose(1, 2), num_parts).transpose(1, 2)
    if gy < num_parts:
        raise ValueError(f"cannot pool a grid of {gy} rows into {num_parts} parts")
    maps = patch_tokens.transpose(1, 2).reshape(B, D, gy, gx)
    return F.adaptive_avg_pool2d(maps, (num_parts, 1)).flatten(2).transpose(1, 2)  # [B, P, D]


# --------------------------------------------------------------------------------------------
# OEM
# --------------------------------------------------------------------------------------------
class OEM(nn.Module):
    """Occlusion Erasing Module (Eq. 1): one scoring head per part.

    Head ``i``: ``Linear(D, D/r) -> LayerNorm(D/r) -> Linear(D/r, 1) -> Sigmoid`` (r = 4,
    with biases as coded, PyTorch default init). ``forward(parts [B, P, D])`` returns
    ``(erased [B, P, D] = s_i * p_i, scores [B, P])``. Head ``i`` is ``heads[i]``, a
    ``Sequential`` indexed like the official ``mask_detection[i]``.
    """

    def __init__(self, dim: int, num_parts: int = 4, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.num_parts = num_parts
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 1), nn.Sigmoid())
            for _ in range(num_parts)
        )

    def forward(self, parts: Tensor) -> Tuple[Tensor, Tensor]:
        if parts.dim() != 3 or parts.shape[1] != self.num_parts:
            raise ValueError(f"OEM expects parts [B, {self.num_parts}, D], got {tuple(parts.shape)}")
        # One small head per part (P is a model constant, not a batch dimension).
        scores = torch.cat([head(parts[:, i]) for i, head in enumerate(self.heads)], dim=1)  # [B, P]
        return parts * scores.unsqueeze(-1), scores


# --------------------------------------------------------------------------------------------
# Memory search
# --------------------------------------------------------------------------------------------
def memory_search(
    x: torch.Tensor,
    memory_normalized: torch.Tensor,
    k: int = 8,
    labels: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FED's memory search: the ``k`` nearest identity centres by cosine similarity.

    Official ``feature_search`` (fed-official.md §2.2 step 8), batched:

    * cosine similarity of ``normalize(x)`` to the normalised centres, top ``k + 1``
      in descending order;
    * with ``labels`` (training): if the sample's own identity is among them it is
      removed, otherwise the ``(k+1)``-th is dropped, leaving ``k`` centres of *other*
      identities in rank order (the paper: "K nearest centers with different identities");
    * without ``labels`` (eval): the first ``k``.

    ``k`` is clamped to ``C - 1`` (training) / ``C`` (eval) for tiny datasets.

    Args:
        x: ``[B, F]`` features (no gradient flows through the search).
        memory_normalized: ``[C, F]`` L2-normalised centres (:meth:`IdentityMemory.normalized`).
        labels: ``[B]`` identity rows to exclude, or ``None``.

    Returns:
        ``(latents [B, k, F], index [B, k])``: the normalised centres and their rows.
    """
    C = memory_normalized.shape[0]
    B = x.shape[0]
    k = min(int(k), C - 1 if labels is not None else C)
    if k < 1:
        raise OccReIDError(f"FED memory search needs at least 2 identities; the memory has {C}")
    sim = F.normalize(x.detach().to(memory_normalized.dtype), dim=1) @ memory_normalized.t()  # [B, C]
    if labels is None:
        index = sim.topk(k, dim=1).indices  # [B, k]
    else:
        cand = sim.topk(k + 1, dim=1).indices  # [B, k+1]
        own = cand == labels.to(cand.device).view(B, 1)  # at most one True per row
        drop = own.clone()
        drop[:, -1] |= ~own.any(dim=1)  # no own id among them -> drop the (k+1)-th
        # exactly one dropped per row: the kept positions in rank order are the first k of a
        # stable sort on the drop flag (a gather, no boolean indexing: no host sync)
        keep_pos = torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices[:, :k]
        index = cand.gather(1, keep_pos)
    return memory_normalized[index], index


# --------------------------------------------------------------------------------------------
# FDM
# --------------------------------------------------------------------------------------------
class FDMCrossAttention(nn.Module):
    """FDM multi-head cross-attention (Eq. 4-6), official dimensions.

    The query is the whole feature ``f'`` as one ``F``-d token; keys and values come from the
    ``K`` searched centres. ``q = W_q f'`` (no bias), ``[k; v] = W_kv m_j`` (no bias, rows
    ``0..F-1`` are k, ``F..2F-1`` are v), ``H`` heads of ``F / H`` dims (contiguous chunks),
    ``a = softmax_j(q_h . k_hj * scale)``, output ``proj(concat_h sum_j a_hj v_hj)`` (with
    bias) viewed as ``[B, P, D]``. No residual, no dropout.

    ``scale="official"``: ``(D / H)^-0.5`` (the code passes the part width; 96^-0.5 for
    ViT-B although heads are 384-d); ``"standard"``: ``(F / H)^-0.5``.

    ``head_merge`` decides how the per-head outputs ``o [B, H, F/H]`` become one ``F``-d
    vector per sample before ``proj``:

    * ``"official"``: the official code calls ``.transpose(1, 2)`` on a 5-D tensor whose
      dims are ``[1, B, H, 1, F/H]``, which swaps the *batch* and *head* axes; the
      following ``reshape(B, 1, F)`` then fills sample ``b``'s chunk ``c`` with head
      ``(b H + c) // B`` of sample ``(b H + c) % B``. The diffused feature of a sample is
      thus assembled from heads of *other samples in the batch* (it depends on the batch
      size and order). Reproduced exactly as ``o.permute(1, 0, 2).reshape(B, F)``; this is
      what produced the published numbers (and the golden vectors).
    * ``"per_sample"``: each sample's own heads concatenated (Eq. 4-6 of the paper).
    """

    def __init__(
        self,
        dim: int,
        num_parts: int = 4,
        num_heads: int = 8,
        scale: str = "official",
        head_merge: str = "official",
    ) -> None:
        super().__init__()
        check_choice("attn_scale", scale, ATTN_SCALES)
        check_choice("head_merge", head_merge, HEAD_MERGES)
        self.head_merge = head_merge
        width = dim * num_parts
        if width % num_heads:
            raise ValueError(f"feature width {width} is not divisible by {num_heads} heads")
        self.dim, self.num_parts, self.num_heads = dim, num_parts, num_heads
        self.head_dim = width // num_heads
        self.scale = (dim / num_heads) ** -0.5 if scale == "official" else self.head_dim**-0.5
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """``x [B, F]``, ``latents [B, K, F]`` -> diffused ``f_d [B, P, D]``."""
        B, K, width = latents.shape
        H, dh = self.num_heads, self.head_dim
        q = self.q(x).view(B, H, dh)  # [B, H, dh]
        k, v = self.kv(latents).view(B, K, 2, H, dh).unbind(2)  # [B, K, H, dh] each
        attn = torch.einsum("bhd,bkhd->bhk", q, k).mul(self.scale).softmax(dim=-1)  # [B, H, K]
        out = torch.einsum("bhk,bkhd->bhd", attn, v)  # [B, H, dh]
        if self.head_merge == "official":
            out = out.permute(1, 0, 2)  # [H, B, dh]: the official batch/head swap
        out = out.reshape(B, width)  # [B, F]
        return self.proj(out).view(B, self.num_parts, self.dim)


class GEGLUFeedForward(nn.Module):
    """Official FDM feed-forward (``trans_ffn3``): pre-LN GEGLU, applied per part token.

    ``LN(D) -> Linear(D, 2 m D) -> value * GELU(gate) -> Dropout -> Linear(m D, D)`` where
    ``value`` / ``gate`` are the first / second halves. No residual.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * mult * dim)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.fc1(self.norm(x)).chunk(2, dim=-1)
        return self.fc2(self.drop(value * F.gelu(gate)))


class PostNormFeedForward(nn.Module):
    """The paper's FFN: ``LN(x + Linear(GELU(Linear(x))))`` (post-LN with residual)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mult * dim)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mult * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.fc2(self.drop(F.gelu(self.fc1(x)))))


class FDM(nn.Module):
    """Feature Diffusion Module (Eq. 4-7) up to (not including) the BNNecks.

    ``forward(x [B, F], latents [B, K, F], scores [B, P])`` returns the diffused features
    ``f'_d = FFN2(FFN1(f_d) * s + f') [B, P, D]`` with ``f_d`` the cross-attention output and
    ``f'`` = ``x`` viewed ``[B, P, D]``. ``ffn1`` / ``ffn2`` are the paper's FFN1 / FFN2
    (official ``ffn2`` / ``ffn3``).
    """

    def __init__(
        self,
        dim: int,
        num_parts: int = 4,
        num_heads: int = 8,
        ffn_mult: int = 4,
        attn_scale: str = "official",
        ffn_style: str = "official",
        head_merge: str = "official",
    ) -> None:
        super().__init__()
        check_choice("ffn_style", ffn_style, FFN_STYLES)
        self.dim, self.num_parts = dim, num_parts
        self.attn = FDMCrossAttention(dim, num_parts, num_heads, attn_scale, head_merge)
        ffn = GEGLUFeedForward if ffn_style == "official" else PostNormFeedForward
        self.ffn1 = ffn(dim, ffn_mult)
        self.ffn2 = ffn(dim, ffn_mult)

    def forward(
        self, x: Tensor, latents: Tensor, scores: Tensor, *, return_intermediates: bool = False
    ):
        B = x.shape[0]
        f_d = self.attn(x, latents)  # [B, P, D]
        h = self.ffn1(f_d)  # [B, P, D]
        out = self.ffn2(h * scores.unsqueeze(-1) + x.view(B, self.num_parts, self.dim))  # Eq. 7
        if return_intermediates:
            return out, {"attn": f_d, "ffn1": h}
        return out


# --------------------------------------------------------------------------------------------
# FED model
# --------------------------------------------------------------------------------------------
class FED(nn.Module):
    """FED on a ViT backbone: NPO two-branch training, OEM, memory, FDM, official losses.

    Args:
        backbone: a ViT returning all tokens after the final norm ``[B, 1 + N, D]`` and
            exposing ``embed_dim`` and ``grid_size`` (:func:`occreid.models.build_backbone`).
        num_classes: number of training identities ``C``.
        num_parts: ``P`` stripes / parts (4).
        num_neighbours: ``K`` centres searched for the FDM (8; official top-9 minus own id).
        num_heads, ffn_mult, oem_reduction: FDM heads (8), FFN width multiplier (4), OEM
            bottleneck ratio (4).
        memory_momentum, temperature: memory momentum ``m`` (0.2) and contrastive ``tau`` (0.05).
        Switches: see the module docstring (defaults = official code).

    Contract (``occreid.models``):

    * **training** ``forward(images [B, 7, H, W], cam_ids=None, pids [B])``: the
      :class:`occreid.data.npo.NPOTransform` batch (clean, occluded, ``|x - x'|``). ``pids``
      is required in training (the memory search excludes each sample's own identity).
      Returns a dict: ``logits_{oem,fdm,global}_{clean,occ}``
      ``[B, C]``, ``feat_{oem,fdm}_{clean,occ}`` ``[B, F]``, ``scores_{clean,occ}`` ``[B, P]``,
      ``mask`` ``[B, P]``.
    * ``loss(outputs, pids) -> dict[str, Tensor]``: the weighted terms of
      :func:`occreid.losses.fed_losses.fed_losses`; the trainer sums them.
    * after each optimiser step: :meth:`update_memory` ``(outputs, pids)``.
    * before training: :meth:`init_memory_from_loader` (or :meth:`memory_features` +
      :meth:`init_memory`).
    * the engine's training step runs these through :class:`occreid.methods.fed.FEDSpec`
      (memory init at train start, forward with pids, loss, step, memory update).
    * **eval** ``forward(images [B, 3, H, W], cam_ids=None)`` -> :meth:`forward_features`:
      ``{"feat" [B, F], "part_scores" [B, P], "global" [B, D]}``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        num_parts: int = 4,
        num_neighbours: int = 8,
        num_heads: int = 8,
        ffn_mult: int = 4,
        oem_reduction: int = 4,
        memory_momentum: float = 0.2,
        temperature: float = 0.05,
        global_token: str = "patch1",
        attn_scale: str = "official",
        ffn_style: str = "official",
        fdm_head_merge: str = "official",
        memory_update: str = "sequential",
        memory_banks: str = "shared",
        memory_init: str = "no_oem",
        fdm_bn: str = "shared",
        loss_weights: str = "official",
        mask_rule: str = "official",
        part_pooling: str = "rows",
        oem: bool = True,
        fdm: bool = True,
    ) -> None:
        super().__init__()
        check_choice("global_token", global_token, GLOBAL_TOKENS)
        check_choice("memory_update", memory_update, UPDATE_RULES)
        check_choice("memory_banks", memory_banks, MEMORY_BANKS)
        check_choice("memory_init", memory_init, MEMORY_INITS)
        check_choice("fdm_bn", fdm_bn, FDM_BNS)
        check_choice("loss_weights", loss_weights, tuple(FED_LOSS_WEIGHTS))
        check_choice("mask_rule", mask_rule, MASK_RULES)
        check_choice("part_pooling", part_pooling, PART_POOLINGS)
        if num_classes < 2:
            raise ValueError(f"FED needs at least 2 training identities, got num_classes={num_classes}")
        D = int(backbone.embed_dim)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.num_parts = int(num_parts)
        self.part_dim = D
        self.feature_dim = D * self.num_parts
        self.num_neighbours = int(num_neighbours)
        self.temperature = float(temperature)
        self.global_token = global_token
        self.memory_banks = memory_banks
        self.memory_init = memory_init
        self.loss_weights = loss_weights
        self.mask_rule = mask_rule
        self.part_pooling = part_pooling
        if int(backbone.grid_size[0]) < self.num_parts and part_pooling == "rows":
            raise ValueError(
                f"the backbone's token grid has {backbone.grid_size[0]} rows, fewer than "
                f"num_parts={num_parts}; use fewer parts or a larger image / smaller stride"
            )

        Fd = self.feature_dim
        self.oem = OEM(D, self.num_parts, oem_reduction) if oem else None
        self.part_bn = BNNeck(Fd)  # = P per-part BNNecks (official bottleneck_local)
        self.fdm = (
            FDM(D, self.num_parts, num_heads, ffn_mult, attn_scale, ffn_style, fdm_head_merge)
            if fdm
            else None
        )
        self.fdm_bn = BNNeck(Fd) if fdm_bn == "separate" and fdm else None
        self.classifier_oem = Classifier(Fd, num_classes)  # official classifier1
        self.classifier_fdm = Classifier(Fd, num_classes) if fdm else None  # classifier2
        self.classifier_global = Classifier(D, num_classes)  # official classifier3
        self.memory = IdentityMemory(num_classes, Fd, momentum=memory_momentum, update_rule=memory_update)
        self.memory_fdm = (
            IdentityMemory(num_classes, Fd, momentum=memory_momentum, update_rule=memory_update)
            if memory_banks == "separate" and fdm
            else None
        )
        if num_classes - 1 < self.num_neighbours:
            logger.warning(
                "FED: only %d identities; the memory search uses K=%d instead of %d",
                num_classes, num_classes - 1, self.num_neighbours,
            )
        self._update_pending = False
        self._warned_no_update = False

    # ------------------------------------------------------------------ pieces
    def _parts(self, images: Tensor, cam_ids: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Backbone -> (global token [B, D], parts [B, P, D])."""
        tokens = self.backbone(images, cam_ids)  # [B, 1 + N, D]
        glob = tokens[:, 1] if self.global_token == "patch1" else tokens[:, 0]
        parts = part_pool(tokens[:, 1:], self.backbone.grid_size, self.num_parts, self.part_pooling)
        return glob, parts

    def _erase(self, parts: Tensor) -> Tuple[Tensor, Tensor]:
        """OEM, or the identity with scores 1 when the OEM is ablated (``oem=False``)."""
        if self.oem is None:
            return parts, parts.new_ones(parts.shape[:2])
        return self.oem(parts)

    def _fdm_bn(self) -> nn.Module:
        return self.part_bn if self.fdm_bn is None else self.fdm_bn

    def _bank_fdm(self) -> IdentityMemory:
        return self.memory if self.memory_fdm is None else self.memory_fdm

    def _diffuse(
        self, feat: Tensor, scores: Tensor, labels: Optional[Tensor], bank_normalized: Optional[Tensor] = None
    ) -> Tensor:
        """Memory search + FDM, ``feat [B, F]`` -> diffused ``[B, P, D]`` (before the BNNeck).
        ``bank_normalized``: the normalised memory when the caller already has it."""
        if self.fdm is None:
            raise OccReIDError("this FED model was built with fdm=False: it has no FDM")
        if bank_normalized is None:
            self.memory.check_initialized()
            bank_normalized = self.memory.normalized()
        latents, _ = memory_search(feat, bank_normalized.to(feat.dtype), self.num_neighbours, labels)
        return self.fdm(feat, latents, scores)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, cam_ids: Optional[Tensor] = None, pids: Optional[Tensor] = None):
        if not self.training:
            return self.forward_features(images, cam_ids)
        return self.forward_train(images, cam_ids, pids)

    def forward_train(self, images: Tensor, cam_ids: Optional[Tensor], pids: Optional[Tensor]) -> Dict[str, Tensor]:
        if images.dim() != 4 or images.shape[1] != 7:
            raise OccReIDError(
                f"FED training expects the 7-channel NPO batch [B, 7, H, W] (clean, occluded, "
                f"|x - x'|) built by occreid.data.npo.NPOTransform; got shape {tuple(images.shape)}"
            )
        if pids is None:
            raise OccReIDError(
                "FED's training forward needs the identity labels: call model(images, cam_ids, "
                "pids=pids) (its memory search excludes each sample's own identity)"
            )
        if self._update_pending and not self._warned_no_update:
            logger.warning(
                "FED: two training forwards without update_memory() in between; the memory bank "
                "is updated only when the trainer calls model.update_memory(outputs, pids)"
            )
            self._warned_no_update = True
        B = images.shape[0]
        pids = pids.to(images.device).long()
        clean, occluded = images[:, 0:3], images[:, 3:6]
        with torch.no_grad():
            mask = stripe_mask(images[:, 6], self.num_parts, rule=self.mask_rule)  # [B, P]
        # Both views share every backbone parameter. They go through it one after the other,
        # as in the official code (which also draws drop-path masks in that order); two
        # B-image passes rather than one 2B-image pass also keep every activation half as
        # large, which the CPU allocator serves without fresh page mappings at B = 16.
        glob_clean, parts_clean = self._parts(clean, cam_ids)
        glob_occ, parts_occ = self._parts(occluded, cam_ids)
        glob = torch.cat([glob_clean, glob_occ])  # [2B, D]
        parts = torch.cat([parts_clean, parts_occ])  # [2B, P, D]
        del glob_clean, glob_occ, parts_clean, parts_occ
        erased, scores = self._erase(parts)  # [2B, P, D], [2B, P]
        # BNNeck per branch (separate batch statistics, official call order).
        feat_clean = self.part_bn(erased[:B].flatten(1))  # [B, F]
        feat_occ = self.part_bn(erased[B:].flatten(1))
        feat = torch.cat([feat_clean, feat_occ])
        logits_global = self.classifier_global(glob)
        logits_oem = self.classifier_oem(feat)
        out = {
            "logits_oem_clean": logits_oem[:B], "logits_oem_occ": logits_oem[B:],
            "logits_global_clean": logits_global[:B], "logits_global_occ": logits_global[B:],
            "feat_oem_clean": feat_clean, "feat_oem_occ": feat_occ,
            "mask": mask,
        }
        if self.oem is not None:
            out.update(scores_clean=scores[:B], scores_occ=scores[B:])
        if self.fdm is not None:
            # FDM per branch: with the official head merge a sample's output mixes heads of the
            # other samples of its own branch's batch, so the branches must not be concatenated.
            bn = self._fdm_bn()
            self.memory.check_initialized()
            bank_n = self.memory.normalized()  # once for both branches
            fdm_clean = bn(self._diffuse(feat_clean, scores[:B], pids, bank_n).flatten(1))  # [B, F]
            fdm_occ = bn(self._diffuse(feat_occ, scores[B:], pids, bank_n).flatten(1))
            logits_fdm = self.classifier_fdm(torch.cat([fdm_clean, fdm_occ]))
            out.update(
                logits_fdm_clean=logits_fdm[:B], logits_fdm_occ=logits_fdm[B:],
                feat_fdm_clean=fdm_clean, feat_fdm_occ=fdm_occ,
            )
        self._update_pending = True
        return out

    def forward_features(
        self, images: Tensor, cam_ids: Optional[Tensor] = None, *, with_fdm: bool = False
    ) -> Dict[str, Tensor]:
        """Test-time outputs for ``images [B, 3, H, W]``.

        Returns ``{"feat": [B, F] retrieval feature (OEM-weighted, BNNeck'd parts),
        "part_scores": [B, P] occlusion scores (1 = visible), "global": [B, D]}`` and with
        ``with_fdm`` also ``"fdm_feat"`` ``[B, F]`` (memory search without label exclusion,
        FDM, BNNeck; needs an initialised memory; what the official evaluator reports as the
        "reconstructed" feature). Call in eval mode for test features.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise OccReIDError(
                f"FED inference expects RGB images [B, 3, H, W]; got shape {tuple(images.shape)}"
            )
        glob, parts = self._parts(images, cam_ids)
        erased, scores = self._erase(parts)
        feat = self.part_bn(erased.flatten(1))
        out = {"feat": feat, "part_scores": scores, "global": glob}
        if with_fdm:
            out["fdm_feat"] = self._fdm_bn()(self._diffuse(feat, scores, None).flatten(1))
        return out

    @torch.no_grad()
    def occlusion_scores(self, images: Tensor, cam_ids: Optional[Tensor] = None) -> Tensor:
        """Per-part occlusion scores ``[B, P]`` in (0, 1) (1 = visible), for visualisation."""
        return self.forward_features(images, cam_ids)["part_scores"]

    # ------------------------------------------------------------------ losses
    def loss(self, outputs: Mapping[str, Tensor], pids: Tensor) -> Dict[str, Tensor]:
        """Weighted FED loss terms (official weights by default); sum them for the total.

        The contrastive terms read the memory *before* this step's update, as the official
        code does (it updates inside the backward pass).
        """
        return fed_losses(
            outputs,
            pids,
            self.memory.features,
            None if self.memory_fdm is None else self.memory_fdm.features,
            weights=self.loss_weights,
            temperature=self.temperature,
        )

    # ------------------------------------------------------------------ memory hooks
    @torch.no_grad()
    def memory_features(self, images: Tensor, cam_ids: Optional[Tensor] = None) -> Tensor:
        """Features that initialise the memory, ``[B, F]`` (call in eval mode, RGB test transform).

        ``memory_init="no_oem"`` (official): part-pooled tokens through the BNNecks without the
        OEM weighting; ``"oem"`` (paper): the OEM-weighted feature ``f'``.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise OccReIDError(
                f"memory initialisation expects RGB images [B, 3, H, W] (test transform); got {tuple(images.shape)}"
            )
        _, parts = self._parts(images, cam_ids)
        if self.memory_init == "oem":
            parts = self._erase(parts)[0]
        return self.part_bn(parts.flatten(1))

    @torch.no_grad()
    def init_memory(self, features: Tensor, pids: Tensor) -> None:
        """Set the bank(s) to the per-identity mean of ``features [N, F]`` (DDP: all-reduced)."""
        self.memory.init_from_features(features, pids)
        if self.memory_fdm is not None:
            self.memory_fdm.copy_from(self.memory)
        self._update_pending = False

    @torch.no_grad()
    def init_memory_from_loader(self, loader: Iterable, device: Optional[torch.device] = None) -> None:
        """One pass over ``loader`` (batches ``{"images", "pids"[, "camids"]}`` or
        ``(images, pids[, camids])``, RGB test transform, the whole training set) in eval mode,
        then :meth:`init_memory`. The training mode is restored afterwards. Under DDP each
        process may see its own shard; the centres are all-reduced.
        """
        if device is None:
            device = self.memory.features.device
        was_training = self.training
        self.eval()
        feats, labels = [], []
        try:
            for batch in loader:
                if isinstance(batch, Mapping):
                    images, pids, cams = batch["images"], batch["pids"], batch.get("camids")
                else:
                    images, pids = batch[0], batch[1]
                    cams = batch[2] if len(batch) > 2 else None
                if getattr(self.backbone, "num_cameras", 0) == 0:
                    cams = None
                elif cams is not None:
                    cams = torch.as_tensor(cams).to(device)
                feats.append(self.memory_features(images.to(device), cams).float())
                labels.append(torch.as_tensor(pids).to(device))
        finally:
            self.train(was_training)
        if not feats:
            raise OccReIDError("memory initialisation got an empty loader; pass the training-set loader")
        self.init_memory(torch.cat(feats), torch.cat(labels))

    @torch.no_grad()
    def update_memory(self, outputs: Mapping[str, Tensor], pids: Tensor) -> None:
        """Momentum-update the memory after a training step (all-gathered under DDP).

        Official (``memory_banks="shared"``): the one bank is written by the clean FDM
        features and then by the clean OEM features (the order autograd ran the official
        in-backward updates), so the OEM update comes last. Paper (``"separate"``): the OEM
        bank by the clean OEM features, the FDM bank by the clean FDM features. The occluded
        branch never writes (official ``self_momentum=1``).
        """
        pids = pids.to(outputs["feat_oem_clean"].device).long()
        if self.memory_fdm is None:
            if "feat_fdm_clean" in outputs:
                self.memory.update(outputs["feat_fdm_clean"], pids)
            self.memory.update(outputs["feat_oem_clean"], pids)
        else:
            self.memory.update(outputs["feat_oem_clean"], pids)
            self.memory_fdm.update(outputs["feat_fdm_clean"], pids)
        self._update_pending = False


# --------------------------------------------------------------------------------------------
# Official checkpoint names
# --------------------------------------------------------------------------------------------
_OFFICIAL_FFN = {"layers2.norm.": "norm.", "layers2.fn.net.0.": "fc1.", "layers2.fn.net.3.": "fc2."}
_OFFICIAL_DEAD = ("classifier_local.", "bottleneck_local_stage2.", "base.fc.")


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor], num_parts: int = 4
) -> Dict[str, Tensor]:
    """Rename an official FED ``build_transformer`` state dict to :class:`FED` names.

    ``base.*`` -> ``backbone.*``; ``mask_detection.{i}.{j}`` -> ``oem.heads.{i}.{j}``;
    the per-part ``bottleneck_local.{i}`` BNs are concatenated into ``part_bn``;
    ``cross_attention.*`` -> ``fdm.attn.*``; ``ffn2`` / ``ffn3`` -> ``fdm.ffn1`` /
    ``fdm.ffn2``; ``classifier1/2/3`` -> ``classifier_oem/fdm/global``. A ``module.``
    prefix is removed; dead modules (``classifier_local``, ``bottleneck_local_stage2``,
    ``base.fc``) are dropped. Other keys are passed through unchanged. The memory bank is
    saved separately by the official code: load it with ``model.memory.features.copy_(...)``.
    """
    out: Dict[str, Tensor] = {}
    bn_parts: Dict[str, Dict[int, Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith(_OFFICIAL_DEAD):
            continue
        if key.startswith("base."):
            out["backbone." + key[len("base."):]] = value
        elif key.startswith("mask_detection."):
            out["oem.heads." + key[len("mask_detection."):]] = value
        elif key.startswith("bottleneck_local."):
            _, idx, name = key.split(".", 2)
            bn_parts.setdefault(name, {})[int(idx)] = value
        elif key.startswith("cross_attention."):
            out["fdm.attn." + key[len("cross_attention."):]] = value
        elif key.startswith(("ffn2.", "ffn3.")):
            target = "fdm.ffn1." if key.startswith("ffn2.") else "fdm.ffn2."
            rest = key[len("ffn2."):]
            for old, new in _OFFICIAL_FFN.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[target + rest] = value
        elif key.startswith(("classifier1.", "classifier2.", "classifier3.")):
            name = {"1": "oem", "2": "fdm", "3": "global"}[key[len("classifier")]]
            out[f"classifier_{name}." + key.split(".", 1)[1]] = value
        else:
            out[key] = value
    for name, parts in bn_parts.items():
        if sorted(parts) != list(range(num_parts)):
            raise OccReIDError(
                f"official checkpoint has bottleneck_local parts {sorted(parts)} for {name!r}; "
                f"expected 0..{num_parts - 1}"
            )
        if name == "num_batches_tracked":
            out["part_bn.num_batches_tracked"] = parts[0]
        else:
            out["part_bn." + name] = torch.cat([parts[i] for i in range(num_parts)])
    return out
