"""DPM: Dynamic Prototype Mask for occluded person re-identification (Tan et al., ACM MM 2022).

Faithful to the official code (``stone96123/DPM``); every accuracy-relevant difference from the
paper is a named switch whose other value is the paper's variant (dpm-official.md §0,
``docs/methods/dpm.md``). Pieces, with the paper's names:

- **HMG** (Hierarchical Mask Generator, Eq. 3): the patch tokens of blocks 2, 4, 10 and 12
  (scaled to the model's depth) as [B, D, gy, gx] maps, concatenated on channels, then
  conv3×3-BN-ReLU → pool 2×2 → conv3×3-BN-ReLU → pool 2×2 → conv3×3-BN-ReLU → global pool →
  Linear(D, D) (zero-initialised weight) → sigmoid: one mask M ∈ (0, 1)^D per image.
  Official pooling is max (``pooling="max"``); the paper writes AvgPool (``pooling="avg"``) and
  no final linear layer (``mask_fc=False``).
- **Masked prototypes** (Eq. 4): one prototype matrix W [C, D] shared by the plain branch
  (f·Wᵀ, softmax CE, L_cls) and the masked branch (cos(x̂, normalize(m ⊙ Ŵ_j)) with an ArcFace
  margin, L_M-cls, Eq. 7).
- **HEM** (Head Enrich Module, Eq. 5-6): the last block's class-token attention over the patch
  keys, row-normalised, pushed towards orthogonal heads. Official: the **pre-softmax** scaled
  logits q_cls·k_j/√(D/N) (``hem_attention="logits"``); paper: their softmax over the patches
  (``"softmax"``). Official reduction: summed over the batch, divided by N².
- **Loss** (Eq. 8): α·L_cls + (1 − α)·L_M-cls + β·L_hem + L_tri, α = 0.5, β = 0.1, soft-margin
  batch-hard triplet on the pre-BNNeck feature.
- **Two-step update** (dpm-official.md §6): two optimisers over disjoint parameter sets
  (:meth:`DPM.hmg_parameters` / :meth:`DPM.main_parameters`), two full forward/backward
  passes per batch, the HMG optimiser at a constant learning rate; run by the engine's one
  training step through :class:`occreid.methods.dpm.DPMSpec`.
- **Retrieval** (dpm-official.md §7): each query's mask applied to the gallery features,
  :class:`occreid.methods.dpm.retrieval.MaskedCosineDistance`.

Components are standalone modules on plain tensors; :class:`DPM` wires them to the ViT backbone.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...losses.arcface import MASK_NORMS, arcface_logits, masked_cosine
from ...losses.hem import HEM_REDUCTIONS, head_orthogonality_loss
from ...losses.triplet import TripletLoss
from ...models.heads import BNNeck
from ..spec import NECK_FEATS, check_choice

logger = logging.getLogger(__name__)

__all__ = [
    "OFFICIAL_HMG_BLOCKS",
    "HMG_POOLINGS",
    "HEM_ATTENTIONS",
    "UPDATE_MODES",
    "SECOND_PASSES",
    "TRAIN_GRADS",
    "HMG_LR_SCHEDULES",
    "scale_block_indices",
    "tokens_to_maps",
    "HierarchicalMaskGenerator",
    "cls_patch_attention_logits",
    "HeadEnrichModule",
    "MaskedPrototypeClassifier",
    "DPM",
    "convert_official_state_dict",
]

#: 1-based blocks whose patch tokens feed the HMG in the official ViT-B (depth 12) model.
OFFICIAL_HMG_BLOCKS: Tuple[int, ...] = (2, 4, 10, 12)
HMG_POOLINGS = ("max", "avg")
HEM_ATTENTIONS = ("logits", "softmax")
#: ``"two_pass"`` (official): two optimisers, two forward/backward passes per batch.
#: ``"single_pass"``: one forward/backward, both optimisers step on the same gradients.
UPDATE_MODES = ("two_pass", "single_pass")
#: The second pass of ``"two_pass"``: ``"hmg_only"`` (default) runs the backbone without
#: autograd and backpropagates through the HMG and the heads only, which gives exactly the HMG
#: gradient of the official ``"full"`` second pass (a full forward/backward through everything).
SECOND_PASSES = ("hmg_only", "full")
#: What a training forward computes gradients for (``DPM.forward(..., grads=...)``): ``"all"``;
#: ``"no_hmg"``: everything but the HMG's own weights (the masked loss still reaches the backbone
#: through the HMG); ``"hmg_only"``: the backbone runs under ``torch.no_grad`` and only the HMG
#: and the heads get gradients.
TRAIN_GRADS = ("all", "no_hmg", "hmg_only")


# --------------------------------------------------------------------------------------------
# HMG
# --------------------------------------------------------------------------------------------


def scale_block_indices(
    blocks: Sequence[int] = OFFICIAL_HMG_BLOCKS, depth: int = 12, reference_depth: int = 12
) -> Tuple[int, ...]:
    """Map 1-based block numbers chosen for a ``reference_depth`` model to a ``depth`` model.

    b ↦ clip(⌊b·depth/reference_depth + 1/2⌋, 1, depth), sorted, duplicates dropped (so a
    shallow model may feed fewer maps to the HMG). (2, 4, 10, 12) stays as is for depth 12 and
    becomes (1, 3, 7, 8) for depth 8, (1, 3, 4) for depth 4 and (1, 2) for depth 2.
    """
    if depth < 1 or reference_depth < 1:
        raise ValueError(f"depths must be >= 1, got depth={depth}, reference_depth={reference_depth}")
    if not blocks:
        raise ValueError("at least one block must feed the HMG")
    for b in blocks:
        if not 1 <= int(b) <= reference_depth:
            raise ValueError(
                f"HMG block {b} is outside 1..{reference_depth} (block numbers are 1-based, "
                f"relative to a depth-{reference_depth} model)"
            )
    scaled = {min(depth, max(1, math.floor(int(b) * depth / reference_depth + 0.5))) for b in blocks}
    return tuple(sorted(scaled))


def tokens_to_maps(tokens: Tensor, grid_size: Sequence[int], num_prefix_tokens: int = 1) -> Tensor:
    """[B, prefix + gy·gx, D] tokens → [B, D, gy, gx] patch map (row-major, prefix dropped).

    map[b, c, y, x] = tokens[b, prefix + gx·y + x, c], the layout of ``conv.flatten(2)``. The
    grid comes from the backbone (``grid_size``), not from the official 2:1 heuristic.
    """
    gy, gx = int(grid_size[0]), int(grid_size[1])
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens [B, T, D], got shape {tuple(tokens.shape)}")
    n = tokens.shape[1] - num_prefix_tokens
    if n != gy * gx:
        raise ValueError(
            f"{tokens.shape[1]} tokens minus {num_prefix_tokens} prefix token(s) = {n} patches, "
            f"but the patch grid is {gy}x{gx} = {gy * gx}"
        )
    return tokens[:, num_prefix_tokens:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gy, gx)


def _detach(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """Official ``conv3x3_block``: Conv2d(k3, s1, p1, bias) → BatchNorm2d → ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=True),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Pool2x2(nn.Module):
    """2×2/stride-2 max (official) or average pooling that never empties a map.

    Identical to ``MaxPool2d(2, 2)`` (floor mode) on every grid with both sides >= 2, which
    covers all official grids (22×11 → 11×5 → 5×2, 21×10 → 10×5 → 5×2). A side of length 1 is
    left unpooled instead of raising, so tiny test grids work.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        k = (2 if x.shape[-2] >= 2 else 1, 2 if x.shape[-1] >= 2 else 1)
        if k == (1, 1):
            return x
        if self.mode == "max":
            return F.max_pool2d(x, k, k)
        return F.avg_pool2d(x, k, k)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, kernel=2, stride=2"


class HierarchicalMaskGenerator(nn.Module):
    """HMG (Eq. 3): M = σ(FC(GlobalPool(G(cat(f_l1, …, f_lk))))), one channel mask per image.

    Args:
        embed_dim: width D of the backbone (the mask has D channels, one per feature channel).
        num_inputs: number k of block maps concatenated on channels (official 4).
        hidden_channels: output widths of the three conv blocks; default (k·D/2, D, D), i.e.
            3072 → 1536 → 768 → 768 for ViT-B, so tiny models get tiny HMGs.
        pooling: ``"max"`` (official: MaxPool 2×2, MaxPool 2×2, global max) or ``"avg"`` (the
            paper's Eq. 3 AvgPool; average everywhere).
        mask_fc: keep the official Linear(D, D) before the sigmoid (``False``: the paper's Eq. 3,
            sigmoid of the pooled map; then the last conv width must be D).
        zero_init_fc: zero the FC weight (official), so every mask starts at 0.5.

    Input: a sequence of k maps [B, D, gy, gx] (or one [B, k·D, gy, gx] tensor). Works for any
    grid, batch (including 1) and width. Module names map to the official checkpoint:
    ``conv_layers.{0,2,4}.{0,1}`` ↔ ``base.ConvLayer.{0,2,4}.{0,1}``, ``fc`` ↔ ``base.attfc``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_inputs: int = 4,
        hidden_channels: Optional[Sequence[int]] = None,
        *,
        pooling: str = "max",
        mask_fc: bool = True,
        zero_init_fc: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in HMG_POOLINGS:
            raise ValueError(f"pooling must be one of {HMG_POOLINGS}, got {pooling!r}")
        if embed_dim < 1 or num_inputs < 1:
            raise ValueError(f"embed_dim and num_inputs must be >= 1, got {embed_dim}, {num_inputs}")
        cin = embed_dim * num_inputs
        if hidden_channels is None:
            hidden_channels = (max(1, cin // 2), embed_dim, embed_dim)
        hidden_channels = tuple(int(c) for c in hidden_channels)
        if len(hidden_channels) != 3 or min(hidden_channels) < 1:
            raise ValueError(f"hidden_channels must be three positive widths, got {hidden_channels}")
        if not mask_fc and hidden_channels[-1] != embed_dim:
            raise ValueError(
                f"without the mask FC the last conv width must equal embed_dim={embed_dim}, "
                f"got {hidden_channels[-1]}"
            )
        c1, c2, c3 = hidden_channels
        self.embed_dim = embed_dim
        self.num_inputs = num_inputs
        self.pooling = pooling
        # Sequential indices mirror the official ConvLayer: 0/2/4 conv blocks, 1/3 pools.
        self.conv_layers = nn.Sequential(
            _conv_bn_relu(cin, c1),
            _Pool2x2(pooling),
            _conv_bn_relu(c1, c2),
            _Pool2x2(pooling),
            _conv_bn_relu(c2, c3),
        )
        self.fc: Optional[nn.Linear] = nn.Linear(c3, embed_dim) if mask_fc else None
        if self.fc is not None:
            # Official: trunc_normal then the weight is zeroed; bias 0 -> M = 0.5 at the start.
            nn.init.trunc_normal_(self.fc.weight, std=0.02)
            if zero_init_fc:
                nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def _concat(self, maps: Any) -> Tensor:
        if isinstance(maps, Tensor):
            x = maps
        else:
            maps = list(maps)
            if len(maps) != self.num_inputs:
                raise ValueError(f"the HMG expects {self.num_inputs} block maps, got {len(maps)}")
            x = torch.cat(maps, dim=1)  # [B, k·D, gy, gx], order of the blocks
        expected = self.embed_dim * self.num_inputs
        if x.dim() != 4 or x.shape[1] != expected:
            raise ValueError(
                f"the HMG expects maps with {expected} channels in total ({self.num_inputs} x "
                f"{self.embed_dim}), got shape {tuple(x.shape)}"
            )
        return x

    def forward_intermediates(self, maps: Any, *, param_grads: bool = True) -> Dict[str, Tensor]:
        """Returns ``pooled`` [B, c3], ``logits`` [B, D] (pre-sigmoid) and ``mask`` [B, D].

        ``param_grads=False``: the same values, computed with the parameters detached, so a
        backward pass reaches the input maps (and what produced them) but computes no
        gradient of the HMG's own weights (DPM's first pass, whose HMG gradient the official
        update discards). BatchNorm statistics are updated as usual.
        """
        x = self._concat(maps)
        if param_grads or not torch.is_grad_enabled():
            x = self.conv_layers(x)
            fc = self.fc
        else:
            detached = {n: p.detach() for n, p in self.conv_layers.named_parameters()}
            x = torch.func.functional_call(self.conv_layers, detached, (x,))
            fc = None if self.fc is None else (lambda t: F.linear(t, self.fc.weight.detach(), _detach(self.fc.bias)))
        if self.pooling == "max":
            pooled = F.adaptive_max_pool2d(x, 1).flatten(1)  # [B, c3]; flatten, not squeeze: B=1
        else:
            pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = fc(pooled) if fc is not None else pooled
        return {"pooled": pooled, "logits": logits, "mask": torch.sigmoid(logits)}

    def forward(self, maps: Any, *, param_grads: bool = True) -> Tensor:
        """Mask M [B, D] in (0, 1)."""
        return self.forward_intermediates(maps, param_grads=param_grads)["mask"]


# --------------------------------------------------------------------------------------------
# HEM
# --------------------------------------------------------------------------------------------


def cls_patch_attention_logits(q_cls: Tensor, k_patch: Tensor, scale: Optional[float] = None) -> Tensor:
    """A[b, h, j] = q_cls[b, h] · k_patch[b, h, j] · scale (Eq. 5 before the softmax).

    Args:
        q_cls: class-token query per head, [B, N, d_h].
        k_patch: patch keys per head (class key excluded), [B, N, P, d_h].
        scale: default d_h^−1/2 (= 1/8 for ViT-B), the paper's 1/√(c/N).

    Returns:
        [B, N, P] pre-softmax logits.
    """
    if q_cls.dim() != 3 or k_patch.dim() != 4 or k_patch.shape[:2] != q_cls.shape[:2]:
        raise ValueError(
            f"expected q_cls [B, N, d] and k_patch [B, N, P, d], got {tuple(q_cls.shape)} and "
            f"{tuple(k_patch.shape)}"
        )
    if k_patch.shape[-1] != q_cls.shape[-1]:
        raise ValueError(f"head widths differ: q {q_cls.shape[-1]} vs k {k_patch.shape[-1]}")
    if scale is None:
        scale = q_cls.shape[-1] ** -0.5
    return (k_patch @ q_cls.unsqueeze(-1)).squeeze(-1) * scale


class HeadEnrichModule(nn.Module):
    """HEM (Eq. 5-6): orthogonality loss between the heads' class-token attention rows.

    Args:
        attention: ``"logits"`` (official: pre-softmax scaled logits) or ``"softmax"`` (the
            paper's Eq. 5, softmax over the patch keys).
        reduction: ``"sum"`` over the batch (official) or ``"mean"``.

    ``forward(attn_logits [B, N, P]) -> scalar``. No parameters: the gradient flows into the last
    block's q/k projections and everything below.
    """

    def __init__(self, attention: str = "logits", reduction: str = "sum") -> None:
        super().__init__()
        if attention not in HEM_ATTENTIONS:
            raise ValueError(f"attention must be one of {HEM_ATTENTIONS}, got {attention!r}")
        if reduction not in HEM_REDUCTIONS:
            raise ValueError(f"reduction must be one of {HEM_REDUCTIONS}, got {reduction!r}")
        self.attention = attention
        self.reduction = reduction

    def forward(self, attn_logits: Tensor) -> Tensor:
        a = attn_logits
        if self.attention == "softmax":
            a = torch.softmax(a.float(), dim=-1)  # over the patch keys only (cls key excluded)
        return head_orthogonality_loss(a, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------------------------
# Masked prototypes
# --------------------------------------------------------------------------------------------


class MaskedPrototypeClassifier(nn.Module):
    """The shared holistic prototypes W [C, D] and their per-sample masked version (Eq. 4).

    ``forward(feat, mask)`` returns ``(logits, cos)``:

    - ``logits`` = f Wᵀ [B, C]: the plain branch (no normalisation, bias or scale), trained with
      softmax CE;
    - ``cos`` [B, C]: cos(x̂_i, normalize(m_i ⊙ Ŵ_j)), the masked branch, to which the loss adds
      the ArcFace margin (:func:`occreid.losses.arcface.arcface_logits`), float32.

    Args:
        in_dim: feature width D.
        num_classes: C.
        mask_feature: also mask the feature (Table 5's F/Fn rows; official False).
        mask_norm: see :data:`occreid.losses.arcface.MASK_NORMS` (official
            ``"mask_then_normalize"``).

    W is xavier-uniform initialised (official). Its name ``weight`` matches the official
    ``classifier.weight``.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        mask_feature: bool = False,
        mask_norm: str = "mask_then_normalize",
    ) -> None:
        super().__init__()
        if mask_norm not in MASK_NORMS:
            raise ValueError(f"mask_norm must be one of {MASK_NORMS}, got {mask_norm!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.mask_feature = bool(mask_feature)
        self.mask_norm = mask_norm
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, feat: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        logits = F.linear(feat, self.weight)  # plain branch  [B, C]
        if mask is None:  # no masked branch (ablation)
            return logits, None
        cos = masked_cosine(
            feat, mask, self.weight, mask_feature=self.mask_feature, mask_norm=self.mask_norm
        )
        return logits, cos

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_classes={self.num_classes}, "
            f"mask_feature={self.mask_feature}, mask_norm={self.mask_norm!r}"
        )


# --------------------------------------------------------------------------------------------
# The DPM model
# --------------------------------------------------------------------------------------------

HMG_LR_SCHEDULES = ("constant", "cosine")


class DPM(nn.Module):
    """Dynamic Prototype Mask on a TransReID ViT (official defaults; switches documented in
    ``docs/methods/dpm.md``).

    Args:
        backbone: a :class:`occreid.models.backbone.ViTBackbone` (anything with
            ``forward_intermediates(images, cam_ids, indices, return_cls_attn)``, ``embed_dim``,
            ``depth`` and ``grid_size``).
        num_classes: training identities C.
        hmg_blocks: 1-based blocks feeding the HMG, relative to a ``hmg_reference_depth``-block
            model and scaled to the backbone's depth (:func:`scale_block_indices`); official
            (2, 4, 10, 12) of 12. Plays the paper's binary gate G.
        hmg_reference_depth: depth the ``hmg_blocks`` refer to (12); pass the backbone's depth
            to use the numbers as they are.
        hmg_hidden_channels: HMG conv widths (default k·D/2, D, D).
        hmg_pooling: ``"max"`` (official) or ``"avg"`` (paper's Eq. 3).
        hmg_fc: keep the official zero-initialised Linear before the sigmoid (paper: none).
        hem_attention: ``"logits"`` (official pre-softmax) or ``"softmax"`` (paper's Eq. 5).
        hem_reduction: ``"sum"`` over the batch (official) or ``"mean"``.
        mask_feature: also mask the feature (Table 5's F rows; official False). Used in training
            and, for the query, in retrieval.
        mask_norm: ``"mask_then_normalize"`` (official) or ``"normalize_then_mask"``.
        arc_scale, arc_margin: ArcFace s and m (official 30 and 0.5; 0.3 in the Market→O-REID
            and DukeMTMC configs).
        alpha: weight of the plain branch; the masked branch gets 1 − α (official 0.5).
        beta: HEM weight (official 0.1; the paper's Occluded-REID value is 0.01).
        id_loss_weight: multiplies α·L_cls + (1 − α)·L_M-cls + β·L_hem (official
            ``ID_LOSS_WEIGHT`` = 1).
        triplet_margin: ``None`` = soft-margin batch-hard triplet (official), else its margin.
        triplet_loss_weight: triplet weight (official 1).
        neck_feat: retrieval feature ``"before"`` (official: pre-BNNeck cls token) or
            ``"after"`` the BNNeck.
        update_mode: ``"two_pass"`` (official) or ``"single_pass"``; read by the spec's
            training passes.
        second_pass: how the second pass of ``"two_pass"`` computes the HMG gradient:
            ``"hmg_only"`` (default; the backbone under ``torch.no_grad``, backward through
            the HMG and the heads only; the first pass then skips the HMG weight gradient it
            would discard) or ``"full"`` (the official full forward/backward through
            everything in both passes). Both give the same HMG gradient and the same update:
            the HMG reads the backbone's block outputs, which do not depend on the HMG.
        hmg_lr_schedule: ``"constant"`` (official: the HMG optimiser has no scheduler) or
            ``"cosine"`` (the paper: same schedule as the rest); read by the
            spec's parameter sets.
        masked_branch: ablation switch (Tables 3-4). ``False`` removes the HMG and the masked
            branch: the loss is ``w·L_cls (+ β·L_hem) + L_tri`` (the plain branch at full weight),
            training is one pass with one optimiser, retrieval is plain cosine. With β = 0 this
            is the ViT baseline in DPM's code path.
        cls_margin: ``None`` (official): the plain branch is the softmax over f·Wᵀ ("S" in
            Table 4); a number: the plain branch is ArcFace on cos(f, W) with scale
            ``arc_scale`` and this margin ("A"). Table 4's masked "S" is ``arc_margin=0``.

    Train mode ``forward`` returns ``{"logits" [B, C], "cos" [B, C], "global_feat" [B, D],
    "mask" [B, D], "cls_attn" [B, N, P] (None when β = 0)}``; :meth:`loss` turns it into
    ``{"id", "arc", "hem", "triplet"}`` (already weighted; the trainer sums them). Eval mode
    returns ``{"feat" [B, D], "mask" [B, D]}``; :class:`occreid.methods.dpm.DPMSpec` gives the
    query-mask distance for the evaluator and runs the two-step update.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        hmg_blocks: Sequence[int] = OFFICIAL_HMG_BLOCKS,
        hmg_reference_depth: int = 12,
        hmg_hidden_channels: Optional[Sequence[int]] = None,
        hmg_pooling: str = "max",
        hmg_fc: bool = True,
        hem_attention: str = "logits",
        hem_reduction: str = "sum",
        mask_feature: bool = False,
        mask_norm: str = "mask_then_normalize",
        arc_scale: float = 30.0,
        arc_margin: float = 0.5,
        alpha: float = 0.5,
        beta: float = 0.1,
        id_loss_weight: float = 1.0,
        triplet_margin: Optional[float] = None,
        triplet_loss_weight: float = 1.0,
        neck_feat: str = "before",
        update_mode: str = "two_pass",
        second_pass: str = "hmg_only",
        hmg_lr_schedule: str = "constant",
        masked_branch: bool = True,
        cls_margin: Optional[float] = None,
    ) -> None:
        super().__init__()
        check_choice("neck_feat", neck_feat, NECK_FEATS)
        check_choice("update_mode", update_mode, UPDATE_MODES)
        check_choice("second_pass", second_pass, SECOND_PASSES)
        check_choice("hmg_lr_schedule", hmg_lr_schedule, HMG_LR_SCHEDULES)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        for attr in ("embed_dim", "depth", "grid_size"):
            if not hasattr(backbone, attr):
                raise TypeError(f"the DPM backbone needs a {attr!r} attribute (use occreid's ViTBackbone)")
        dim = int(backbone.embed_dim)
        self.backbone = backbone
        self.hmg_blocks = scale_block_indices(hmg_blocks, int(backbone.depth), hmg_reference_depth)
        if tuple(self.hmg_blocks) != tuple(int(b) for b in hmg_blocks):
            logger.info(
                "DPM: HMG blocks %s of a %d-block model -> %s for this %d-block backbone",
                tuple(hmg_blocks), hmg_reference_depth, self.hmg_blocks, backbone.depth,
            )
        self.cls_margin = None if cls_margin is None else float(cls_margin)
        self.hmg = (
            HierarchicalMaskGenerator(
                dim, len(self.hmg_blocks), hmg_hidden_channels, pooling=hmg_pooling, mask_fc=hmg_fc
            )
            if masked_branch
            else None
        )
        self.bottleneck = BNNeck(dim)
        self.classifier = MaskedPrototypeClassifier(
            dim, num_classes, mask_feature=mask_feature, mask_norm=mask_norm
        )
        self.hem = HeadEnrichModule(hem_attention, hem_reduction)
        self.triplet = TripletLoss(margin=triplet_margin)
        self.num_classes = int(num_classes)
        self.feature_dim = dim
        self.mask_feature = bool(mask_feature)
        self.mask_norm = mask_norm
        self.arc_scale = float(arc_scale)
        self.arc_margin = float(arc_margin)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.id_loss_weight = float(id_loss_weight)
        self.triplet_loss_weight = float(triplet_loss_weight)
        self.neck_feat = neck_feat
        self.update_mode = update_mode
        self.second_pass = second_pass
        self.hmg_lr_schedule = hmg_lr_schedule

    # ---------------------------------------------------------------------------- forward
    def _features(self, images: Tensor, cam_ids: Optional[Tensor], with_attn: bool, grads: str = "all"):
        indices = self.hmg_blocks if self.hmg is not None else ()
        with torch.no_grad() if grads == "hmg_only" else contextlib.nullcontext():
            out = self.backbone.forward_intermediates(images, cam_ids, indices=indices, return_cls_attn=with_attn)
        tokens, blocks = out[0], out[1]
        cls_attn = out[2] if with_attn else None
        mask = None
        if self.hmg is not None:
            grid = self.backbone.grid_size
            prefix = tokens.shape[1] - grid[0] * grid[1]
            # f_l: patch tokens of block l (pre final-LayerNorm) as [B, D, gy, gx] maps
            maps = [tokens_to_maps(t, grid, prefix) for t in blocks]
            mask = self.hmg(maps, param_grads=grads != "no_hmg")  # M [B, D]
        global_feat = tokens[:, 0]  # LayerNorm(z_L)[:, 0], the cls token  [B, D]
        return global_feat, mask, cls_attn

    def train_grads(self, pass_index: int) -> str:
        """The ``grads`` of the training forward of ``pass_index`` (:data:`TRAIN_GRADS`).

        ``"two_pass"`` with ``second_pass="hmg_only"``: pass 0 steps everything but the HMG, so
        it needs no HMG weight gradient (``"no_hmg"``); pass 1 steps only the HMG, whose input
        (the backbone's block outputs) does not depend on the HMG, so the backbone runs without
        autograd (``"hmg_only"``). Same values, same HMG gradient, same BatchNorm statistics
        and dropout / drop-path draws (train mode throughout) as the full passes.
        """
        if self.hmg is None or self.update_mode != "two_pass" or self.second_pass == "full":
            return "all"
        return "no_hmg" if pass_index == 0 else "hmg_only"

    def forward(self, images: Tensor, cam_ids: Optional[Tensor] = None, *, grads: str = "all") -> Dict[str, Any]:
        """Train mode: ``grads`` (:data:`TRAIN_GRADS`) selects what the pass computes gradients
        for (the spec passes :meth:`train_grads`); eval mode ignores it."""
        if not self.training:
            global_feat, mask, _ = self._features(images, cam_ids, with_attn=False)
            feat = global_feat if self.neck_feat == "before" else self.bottleneck(global_feat)
            return {"feat": feat} if mask is None else {"feat": feat, "mask": mask}
        check_choice("grads", grads, TRAIN_GRADS)
        global_feat, mask, cls_attn = self._features(images, cam_ids, with_attn=self.beta > 0, grads=grads)
        feat_bn = self.bottleneck(global_feat)
        logits, cos = self.classifier(feat_bn, mask)
        out = {"logits": logits, "cos": cos, "global_feat": global_feat, "mask": mask, "cls_attn": cls_attn}
        if self.cls_margin is not None:  # plain branch with an angular margin (Table 4 "A")
            out["cos_cls"] = F.linear(F.normalize(feat_bn.float(), dim=1), F.normalize(self.classifier.weight.float(), dim=1))
        return out

    def loss(self, outputs: Mapping[str, Any], pids: Tensor) -> Dict[str, Tensor]:
        """Eq. 8, weighted: ``id`` = w·α·CE(f Wᵀ), ``arc`` = w·(1 − α)·CE(ArcFace(masked cos)),
        ``hem`` = w·β·L_hem, ``triplet`` = w_tri·L_tri (soft-margin batch-hard on the pre-BN
        feature). w = ``id_loss_weight``. ``hem`` is absent when β = 0."""
        pids = pids.long()
        w = self.id_loss_weight
        if self.cls_margin is None:
            cls_logits = outputs["logits"].float()
        else:
            cls_logits = arcface_logits(outputs["cos_cls"], pids, scale=self.arc_scale, margin=self.cls_margin)
        if self.hmg is None:  # no masked branch: the plain branch at full weight
            losses: Dict[str, Tensor] = {"id": w * F.cross_entropy(cls_logits, pids)}
        else:
            losses = {
                "id": w * self.alpha * F.cross_entropy(cls_logits, pids),
                "arc": w * (1.0 - self.alpha) * F.cross_entropy(
                    arcface_logits(outputs["cos"], pids, scale=self.arc_scale, margin=self.arc_margin), pids
                ),
            }
        if self.beta > 0:
            if outputs.get("cls_attn") is None:
                raise ValueError("HEM needs outputs['cls_attn'] (the model was run with beta = 0?)")
            losses["hem"] = w * self.beta * self.hem(outputs["cls_attn"])
        losses["triplet"] = self.triplet_loss_weight * self.triplet(outputs["global_feat"].float(), pids)
        return losses

    # ------------------------------------------------------------------ two-step training
    def hmg_parameters(self) -> List[nn.Parameter]:
        """Parameters of the HMG (official ``Moptimizer``: names with ConvLayer/attfc)."""
        return [] if self.hmg is None else [p for p in self.hmg.parameters() if p.requires_grad]

    def main_parameters(self) -> List[nn.Parameter]:
        """Every other trainable parameter: backbone, BNNeck weight, prototypes W."""
        hmg_ids = {id(p) for p in self.hmg_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in hmg_ids]

    def extra_repr(self) -> str:
        return (
            f"hmg_blocks={self.hmg_blocks}, arc_scale={self.arc_scale}, arc_margin={self.arc_margin}, "
            f"alpha={self.alpha}, beta={self.beta}, neck_feat={self.neck_feat!r}, "
            f"update_mode={self.update_mode!r}, second_pass={self.second_pass!r}, "
            f"hmg_lr_schedule={self.hmg_lr_schedule!r}"
        )


# --------------------------------------------------------------------------------------------
# Official checkpoint names
# --------------------------------------------------------------------------------------------

_OFFICIAL_PREFIXES = (
    ("base.ConvLayer.", "hmg.conv_layers."),
    ("base.attfc.", "hmg.fc."),
    ("classifier.", "classifier."),
    ("bottleneck.", "bottleneck."),
    ("base.", "backbone."),
)
#: Official entries with no counterpart here (the unused ``base.fc`` ImageNet head).
_OFFICIAL_UNUSED = ("base.fc.",)


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Rename an official DPM ``state_dict`` (``module.`` prefix allowed) to :class:`DPM` names.

    ``base.ConvLayer.*`` → ``hmg.conv_layers.*``, ``base.attfc.*`` → ``hmg.fc.*``,
    ``classifier.weight`` (the shared prototypes) and ``bottleneck.*`` (BNNeck) keep their names,
    every other ``base.*`` → ``backbone.*``; the unused ``base.fc.*`` head is dropped. Tensors
    are not copied.
    """
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(_OFFICIAL_UNUSED):
            continue
        for old, new in _OFFICIAL_PREFIXES:
            if k.startswith(old):
                out[new + k[len(old):]] = value
                break
        else:
            raise KeyError(f"unexpected key {key!r} in an official DPM state dict")
    return out

