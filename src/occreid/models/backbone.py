"""TransReID-style Vision Transformer backbone (He et al., ICCV 2021), built on timm.

What makes it "TransReID-style" (see ``specs/transreid-backbone.md`` §1):

* **Overlapping patch embedding**: a ``Conv2d(3, D, kernel=p, stride=s)`` with ``s <= p``
  (16, 12 or 11 for ViT-B/16), no padding. The token grid is
  ``((H - p) // s_y + 1, (W - p) // s_x + 1)``, flattened row-major (y-major, x-minor).
* **SIE** (side information embedding): a learnable camera table ``sie_embed`` of shape
  ``[num_cameras, 1, D]``, created only when ``num_cameras > 1``. The term
  ``sie_coef * sie_embed[cam_ids]`` is added to *every* token, cls included, together with
  the position embedding.
* Pre-norm timm blocks with LayerNorm eps 1e-6 and exact (erf) GELU; drop path rates
  ``linspace(0, drop_path, depth)``.

The modules keep the timm-0.3.2 / jx checkpoint names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``), so an ImageNet checkpoint loads with an (almost) plain strict ``load_state_dict``;
:mod:`occreid.models.pretrained` does the remaining adaptation (pos-embed resize).

Outputs (shapes for B images, N patches, D channels):

* ``forward(images, cam_ids) -> [B, 1 + N, D]``: all tokens after the final norm
  (the baseline uses token 0, FED uses the patch tokens).
* ``forward_intermediates(images, cam_ids, indices=(2, 4, 10, 12), return_cls_attn=True)``:
  the same final tokens, the raw (pre final-norm) outputs of the listed 1-based blocks, and
  the last block's pre-softmax cls->patch attention logits ``[B, heads, N]`` (DPM's HMG and
  HEM), all from one pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from ..utils import OccReIDError, Registry
from .pretrained import load_pretrained

__all__ = [
    "ViTBackbone",
    "OverlapPatchEmbed",
    "ReIDAttention",
    "ReIDBlock",
    "ViTSpec",
    "BACKBONES",
    "build_backbone",
]

logger = logging.getLogger(__name__)

IntPair = Union[int, Tuple[int, int], Sequence[int]]


def _pair(value: IntPair, what: str) -> Tuple[int, int]:
    """``16 -> (16, 16)``; ``(16, 12) -> (16, 12)``; anything else is a ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(int(v) for v in value)  # type: ignore[union-attr]
        except TypeError:
            raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}") from None
        if len(pair) != 2:
            raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
    if min(pair) <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return pair  # type: ignore[return-value]


class OverlapPatchEmbed(nn.Module):
    """Patch embedding with a configurable stride (TransReID ``PatchEmbed_overlap``).

    ``proj`` is ``Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)`` with
    no padding; ``stride < patch_size`` gives overlapping windows. The input size must equal
    ``img_size`` (the position embedding is sized for its grid).

    Shapes: ``[B, 3, H, W] -> [B, N, D]`` with ``N = gy * gx`` tokens in row-major order.
    The keyword arguments mirror timm's ``PatchEmbed`` so that ``VisionTransformer`` can
    build it through ``embed_layer``.
    """

    def __init__(
        self,
        img_size: IntPair = (256, 128),
        patch_size: IntPair = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        stride: Optional[IntPair] = None,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if dynamic_img_pad:
            raise ValueError("OverlapPatchEmbed has no padding (dynamic_img_pad is not supported)")
        self.img_size = _pair(img_size, "img_size")
        self.patch_size = _pair(patch_size, "patch_size")
        self.stride = _pair(stride if stride is not None else patch_size, "stride")
        (h, w), (py, px), (sy, sx) = self.img_size, self.patch_size, self.stride
        if h < py or w < px:
            raise OccReIDError(
                f"image size {h}x{w} is smaller than the patch size {py}x{px}; "
                f"use an image size of at least {py}x{px}"
            )
        if sy > py or sx > px:
            logger.warning(
                "patch stride %s is larger than the patch size %s: pixels between the windows "
                "are never seen (pass stride=%s or smaller)",
                self.stride,
                self.patch_size,
                self.patch_size,
            )
        self.grid_size = ((h - py) // sy + 1, (w - px) // sx + 1)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride, bias=bias,
            device=device, dtype=dtype,
        )
        # TransReID init (always overwritten by pretrained weights): N(0, sqrt(2 / (k*k*D))).
        fan_out = self.patch_size[0] * self.patch_size[1] * embed_dim
        nn.init.normal_(self.proj.weight, 0.0, math.sqrt(2.0 / fan_out))

    def feat_ratio(self, as_scalar: bool = True) -> Union[int, Tuple[int, int]]:
        """Pixel step between neighbouring tokens (used by timm's ``feature_info``)."""
        return max(self.stride) if as_scalar else self.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, gy, gx] -> [B, gy*gx, D]


class ReIDAttention(Attention):
    """timm ``Attention`` that honours a custom ``scale`` on the fused path too.

    timm's fused branch calls ``F.scaled_dot_product_attention`` without ``scale`` and so
    always uses ``head_dim ** -0.5``. TransReID's vit_small uses ``qk_scale = 768 ** -0.5``
    instead, so ``scale`` is passed explicitly here (both branches).

    ``forward(..., return_cls_logits=True)`` also returns the pre-softmax logits of the cls
    query against the patch keys, ``q_cls . k_j * scale`` for j = 1..N: ``[B, heads, N]``
    (DPM's HEM input), computed from the q/k already produced by this call.

    ``forward(..., num_queries=n)`` computes the output of the first ``n`` tokens only
    (``[B, n, D]``; each query attends over every key), e.g. the cls token of the last block
    when nothing else of it is used.
    """

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        return_cls_logits: bool = False,
        num_queries: Optional[int] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        B, N, _ = x.shape
        # qkv rows are [q | k | v], each split into heads of head_dim contiguous channels:
        # [B, heads, N, head_dim] views with the strides of timm's reshape/permute/unbind (so
        # the same attention inputs), whose backward assembles the qkv gradient with one
        # concatenation instead of a stack and a permuted copy.
        qkv = self.qkv(x)
        q, k, v = (
            t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.split(self.attn_dim, dim=-1)
        )
        q, k = self.q_norm(q), self.k_norm(k)

        cls_logits = None
        if return_cls_logits:
            # [B, h, 1, hd] @ [B, h, hd, N-1] -> [B, h, N-1]
            cls_logits = (q[:, :, :1] @ k[:, :, 1:].transpose(-2, -1)).squeeze(2) * self.scale
        if num_queries is not None:
            if attn_mask is not None or is_causal:
                raise ValueError("num_queries cannot be combined with an attention mask")
            q, x = q[:, :, :num_queries], x[:, :num_queries]
        Nq = q.shape[2]

        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
                scale=self.scale,
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, h, N, N]
            if is_causal:
                attn = attn + attn.new_full((N, N), float("-inf")).triu_(1)
            elif attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    attn = attn.masked_fill(~attn_mask, float("-inf"))
                else:
                    attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v

        out = out.transpose(1, 2).reshape(B, Nq, self.attn_dim)
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        out = self.proj_drop(self.proj(out))
        if return_cls_logits:
            return out, cls_logits  # type: ignore[return-value]
        return out


class _RecomputeSaved(torch.autograd.graph.saved_tensors_hooks):
    """While active, a tensor that autograd saves and that is ``ref`` (or a contiguous view of
    it) is not kept: the backward pass recomputes it with ``fn()``, a cheap deterministic
    function (LayerNorm, GELU) of tensors that other nodes save anyway. The recomputed tensor
    is bit-identical to ``ref``, so the gradients are exactly those of plain autograd; the
    memory of ``ref`` is released as soon as the forward pass drops it."""

    def __init__(self, ref: torch.Tensor, fn: Any) -> None:
        ptr, numel, dtype = ref.data_ptr(), ref.numel(), ref.dtype
        del ref  # no reference to the tensor itself may outlive the forward pass

        def pack(t: torch.Tensor) -> Any:
            if t.data_ptr() == ptr and t.numel() == numel and t.dtype == dtype and t.is_contiguous():
                return (fn, t.shape)
            return t

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, tuple):
                recompute, shape = packed
                with torch.no_grad():
                    return recompute().reshape(shape)
            return packed

        super().__init__(pack, unpack)


class ReIDBlock(Block):
    """timm pre-norm ``Block`` plus a variant of ``forward`` that also returns the cls
    attention logits of its attention layer (see :class:`ReIDAttention`).

    ``lean`` (default, set by :meth:`ViTBackbone.set_lean_activations`): in a training forward
    with autograd, the two LayerNorm outputs and the GELU output are not kept for the backward
    pass (the Linear layers after them would save them) but recomputed there from the tensors
    LayerNorm and GELU save anyway: exactly the same gradients, 36 % less activation memory
    per block (ViT-B: 36 of 97 MiB per block at 16 images of 129 tokens), for one extra
    LayerNorm and GELU per block in the backward pass.
    """

    lean: bool = True

    def _lean_now(self) -> bool:
        return (
            self.lean and self.training and torch.is_grad_enabled()
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
        )

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``self.mlp(self.norm2(x))``, lean when enabled."""
        mlp = self.mlp
        if not self._lean_now() or not isinstance(mlp.norm, nn.Identity):
            return mlp(self.norm2(x))
        h = self.norm2(x)
        with _RecomputeSaved(h, lambda: self.norm2(x)):
            u = mlp.fc1(h)
        del h
        g = mlp.act(u)
        if mlp.drop1.p > 0:  # the dropout mask is not recomputable: keep fc2's input
            return mlp.drop2(mlp.fc2(mlp.drop1(g)))
        with _RecomputeSaved(g, lambda: mlp.act(u)):
            y = mlp.fc2(g)
        return mlp.drop2(y)

    def _attn(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """``self.attn(self.norm1(x), **kwargs)``, lean when enabled."""
        if not self._lean_now():
            return self.attn(self.norm1(x), **kwargs)
        h = self.norm1(x)
        with _RecomputeSaved(h, lambda: self.norm1(x)):
            return self.attn(h, **kwargs)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._attn(x, attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self._mlp(x)))
        return x

    def forward_with_cls_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [B, 1+N, D] -> (block output [B, 1+N, D], cls->patch logits [B, heads, N])``."""
        attn_out, cls_logits = self._attn(x, return_cls_logits=True)
        x = x + self.drop_path1(self.ls1(attn_out))
        x = x + self.drop_path2(self.ls2(self._mlp(x)))
        return x, cls_logits

    def cls_only_exact(self) -> bool:
        """Whether :meth:`forward_cls` equals ``forward(x)[:, :1]`` draw for draw: no dropout
        in training (a dropout mask over one token is not the first row of a mask over all
        tokens; drop path draws one value per sample either way)."""
        if not self.training:
            return True
        drops = (self.attn.attn_drop.p, self.attn.proj_drop.p, self.mlp.drop1.p, self.mlp.drop2.p)
        return not any(p > 0 for p in drops)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for the cls token alone, ``x [B, 1+N, D] -> [B, 1, D]``: its
        query attends over every token, and the projection, the residuals and the MLP run on
        that one token (the other tokens' outputs are not computed)."""
        attn_out = self._attn(x, num_queries=1)
        x = x[:, :1] + self.drop_path1(self.ls1(attn_out))
        return x + self.drop_path2(self.ls2(self._mlp(x)))


class ViTBackbone(VisionTransformer):
    """TransReID ViT: overlapping patches, optional SIE camera embedding, all tokens out.

    A subclass of timm's ``VisionTransformer`` (no classification head, ``num_classes=0``)
    whose parameter names equal those of the timm-0.3.2 / jx ImageNet checkpoints.

    Args:
        img_size: input (H, W); inputs of any other size are rejected.
        patch_size: patch (kernel) size.
        stride: patch stride, int or (sy, sx); ``None`` means ``patch_size``.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        qk_scale: attention logit scale; ``None`` means ``head_dim ** -0.5``.
        num_cameras: number of training cameras; SIE is created only when > 1.
        sie_coef: SIE coefficient (TransReID ``SIE_COE``, 3.0 in all configs).
        drop_path: maximum stochastic-depth rate (block i gets ``drop_path * i / (depth-1)``).
        drop_rate: dropout after the embeddings and inside the MLP / attention projection.
        attn_drop_rate: dropout on the attention weights.
        fused_attn: use ``F.scaled_dot_product_attention`` (default); ``False`` computes the
            attention matrix explicitly.
        in_chans: input channels.
    """

    def __init__(
        self,
        img_size: IntPair = (256, 128),
        patch_size: IntPair = 16,
        stride: Optional[IntPair] = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        num_cameras: int = 0,
        sie_coef: float = 3.0,
        drop_path: float = 0.1,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        fused_attn: bool = True,
        in_chans: int = 3,
    ) -> None:
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        patch_pair = _pair(patch_size, "patch_size")
        stride_pair = _pair(stride if stride is not None else patch_pair, "stride")
        super().__init__(
            img_size=_pair(img_size, "img_size"),
            patch_size=patch_pair,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            pos_drop_rate=drop_rate,
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path,
            embed_layer=partial(OverlapPatchEmbed, stride=stride_pair),
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,  # exact erf GELU, as timm 0.3.2
            block_fn=ReIDBlock,
            attn_layer=ReIDAttention,
        )
        # TransReID initialises cls_token (like pos_embed) with trunc_normal(std .02).
        trunc_normal_(self.cls_token, std=0.02)

        self.depth = depth
        self.num_heads = num_heads
        self.patch_size: Tuple[int, int] = patch_pair
        self.stride: Tuple[int, int] = stride_pair
        self.img_size: Tuple[int, int] = self.patch_embed.img_size
        self.grid_size: Tuple[int, int] = self.patch_embed.grid_size
        self.num_patches: int = self.patch_embed.num_patches
        self.sie_coef = float(sie_coef)
        self.num_cameras = int(num_cameras) if num_cameras > 1 else 0
        if self.num_cameras:
            self.sie_embed = nn.Parameter(torch.zeros(self.num_cameras, 1, embed_dim))
            trunc_normal_(self.sie_embed, std=0.02)
        else:
            self.sie_embed = None
        self.head_dim = embed_dim // num_heads
        self.qk_scale = float(qk_scale) if qk_scale is not None else self.head_dim**-0.5
        for blk in self.blocks:
            blk.attn.scale = self.qk_scale
        self.set_fused_attn(fused_attn)

    # ------------------------------------------------------------------ configuration
    def set_fused_attn(self, enable: bool = True) -> None:
        """Switch every block between fused SDPA and the explicit attention matrix."""
        for blk in self.blocks:
            blk.attn.fused_attn = bool(enable)

    def set_lean_activations(self, enable: bool = True) -> None:
        """Recompute the LayerNorm and GELU outputs in the backward pass instead of keeping
        them (:class:`ReIDBlock`, exact; on by default). Off while activation checkpointing
        is on, which keeps no activations of a block at all."""
        self._lean = bool(enable)
        for blk in self.blocks:
            blk.lean = self._lean and not self.grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the blocks in training (recompute each block's forward
        in the backward pass: the least activation memory, about a third more compute; for
        GPU memory, or very large batches)."""
        super().set_grad_checkpointing(enable)
        self.set_lean_activations(getattr(self, "_lean", True))

    @property
    def fused_attn(self) -> bool:
        return all(blk.attn.fused_attn for blk in self.blocks)

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        raise NotImplementedError(
            "ViTBackbone has a fixed input size; build a new backbone with the new img_size "
            "and load the weights with occreid.models.load_pretrained (it resizes pos_embed)"
        )

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor]) -> None:
        if images.ndim != 4:
            raise OccReIDError(
                f"expected images of shape [B, {self.patch_embed.proj.in_channels}, H, W], "
                f"got a tensor of shape {tuple(images.shape)}"
            )
        if tuple(images.shape[-2:]) != self.img_size:
            h, w = self.img_size
            raise OccReIDError(
                f"this backbone was built for {h}x{w} inputs (img_size) but got "
                f"{images.shape[-2]}x{images.shape[-1]}; resize the images to {h}x{w} "
                f"or build the model with img_size=({images.shape[-2]}, {images.shape[-1]})"
            )
        if self.sie_embed is None:
            return
        if cam_ids is None:
            raise OccReIDError(
                f"this backbone uses SIE camera embeddings ({self.num_cameras} cameras), so "
                "camera ids are required: call it as model(images, cam_ids) with 0-based "
                "camera ids, or build it without SIE (num_cameras=0 / sie_camera=False)"
            )
        if cam_ids.ndim != 1 or cam_ids.shape[0] != images.shape[0]:
            raise OccReIDError(
                f"expected one camera id per image (shape [{images.shape[0]}]), "
                f"got cam_ids of shape {tuple(cam_ids.shape)}"
            )
        if cam_ids.dtype.is_floating_point or cam_ids.dtype == torch.bool:
            raise OccReIDError(f"camera ids must be an integer tensor, got dtype {cam_ids.dtype}")
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return  # the range check below needs a host sync / data-dependent branch
        if bool(((cam_ids < 0) | (cam_ids >= self.num_cameras)).any()):
            raise OccReIDError(
                f"camera ids must lie in [0, {self.num_cameras - 1}] (0-based, {self.num_cameras} "
                f"training cameras); got values from {int(cam_ids.min())} to {int(cam_ids.max())}. "
                "Build the model with the dataset's number of training cameras"
            )

    def embed(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patch embedding + cls token + position embedding (+ SIE), before the blocks.

        ``[B, 3, H, W] -> [B, 1 + N, D]``.
        """
        self._check_inputs(images, cam_ids)
        x = self.patch_embed(images)  # [B, N, D]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [B, 1+N, D]
        pos = self.pos_embed  # [1, 1+N, D]
        if self.sie_embed is not None:
            # sie_embed[cam_ids]: [B, 1, D], broadcast over all tokens (cls included)
            pos = pos + self.sie_coef * self.sie_embed[cam_ids.to(device=x.device, dtype=torch.long)]
        return self.pos_drop(x + pos)

    def _run_block(self, blk: nn.Module, x: torch.Tensor, fn: Optional[Any] = None) -> torch.Tensor:
        fn = blk if fn is None else fn
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def forward_cls(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The cls token after the final norm, ``[B, D]``: ``forward(images, cam_ids)[:, 0]``
        without computing the last block's outputs for the patch tokens, which nothing
        downstream of the cls token reads (the last block's keys and values still come from
        every token). About 6 % fewer FLOPs for ViT-B; the same function (the full last block
        is run instead when dropout is active in training, see
        :meth:`ReIDBlock.cls_only_exact`)."""
        x = self.embed(images, cam_ids)
        for blk in self.blocks[:-1]:
            x = self._run_block(blk, x)
        last = self.blocks[-1]
        if last.cls_only_exact():
            x = self._run_block(last, x, last.forward_cls)
        else:
            x = self._run_block(last, x)[:, :1]
        return self.norm(x)[:, 0]

    def forward_features(  # type: ignore[override]
        self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """All tokens after the final norm: ``[B, 1 + N, D]`` (token 0 is cls)."""
        x = self.embed(images, cam_ids)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return self.norm(x)

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``images [B, 3, H, W]`` (+ ``cam_ids [B]`` with SIE) -> tokens ``[B, 1 + N, D]``."""
        return self.forward_features(images, cam_ids)

    def forward_intermediates(  # type: ignore[override]
        self,
        images: torch.Tensor,
        cam_ids: Optional[torch.Tensor] = None,
        indices: Sequence[int] = (),
        return_cls_attn: bool = False,
    ) -> Union[
        Tuple[torch.Tensor, List[torch.Tensor]],
        Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor],
    ]:
        """One pass returning the final tokens plus intermediate block outputs.

        Args:
            images: ``[B, 3, H, W]``.
            cam_ids: ``[B]`` 0-based camera ids (required with SIE).
            indices: 1-based block numbers whose raw outputs (residual stream, before the
                final norm) are returned, in the order given, e.g. ``(2, 4, 10, 12)``.
            return_cls_attn: also return the last block's pre-softmax cls->patch attention
                logits ``q_cls . k_j * scale`` (cls key excluded), ``[B, heads, N]``.

        Returns:
            ``(tokens [B, 1+N, D], [block outputs [B, 1+N, D], ...])`` and, with
            ``return_cls_attn``, a third element ``cls_logits [B, heads, N]``.
        """
        wanted = [int(i) for i in indices]
        bad = [i for i in wanted if not 1 <= i <= self.depth]
        if bad or any(isinstance(i, bool) for i in indices):
            raise ValueError(
                f"block indices are 1-based and must lie in [1, {self.depth}] for this "
                f"{self.depth}-block backbone; got {list(indices)}"
            )
        x = self.embed(images, cam_ids)
        taken = {}
        cls_logits = None
        last = self.depth - 1
        for i, blk in enumerate(self.blocks):
            if return_cls_attn and i == last:
                x, cls_logits = blk.forward_with_cls_logits(x)
            else:
                x = self._run_block(blk, x)
            if (i + 1) in wanted:
                taken[i + 1] = x
        tokens = self.norm(x)
        intermediates = [taken[i] for i in wanted]
        if return_cls_attn:
            return tokens, intermediates, cls_logits  # type: ignore[return-value]
        return tokens, intermediates


# ---------------------------------------------------------------------- variants
@dataclass(frozen=True)
class ViTSpec:
    """Architecture of a backbone variant (everything but the input size and stride)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_size: int = 16
    qk_scale: Optional[float] = None
    description: str = ""


BACKBONES: Registry = Registry("backbone")


def _register(name: str, spec: ViTSpec, aliases: tuple = ()) -> None:
    BACKBONES.register(name, aliases=aliases)(spec)


_register(
    "vit_base_patch16",
    ViTSpec(768, 12, 12, description="ViT-B/16 (jx / DeiT-B checkpoints), TransReID's default"),
    aliases=("deit_base_patch16",),
)
_register(
    "vit_small_patch16",
    ViTSpec(768, 8, 8, mlp_ratio=3.0, qkv_bias=False, qk_scale=768**-0.5,
            description="TransReID's vit_small: D768, depth 8, heads 8, mlp 3, no qkv bias, scale 768^-0.5"),
)
_register("deit_small_patch16", ViTSpec(384, 12, 6, description="DeiT-S/16"))
_register("vit_tiny_patch16", ViTSpec(192, 12, 3, description="ViT-Ti/16 (timm vit_tiny)"))
_register(
    "vit_mini_patch16",
    ViTSpec(128, 4, 4, description="CPU demo model: D128, depth 4, heads 4, patch 16 (0.9 M parameters)"),
)
_register(
    "vit_mini_patch8",
    ViTSpec(128, 4, 4, patch_size=8,
            description="CPU demo model: D128, depth 4, heads 4, patch 8 (128 tokens at 128x64)"),
)
_register(
    "vit_micro_patch8",
    ViTSpec(96, 6, 3, patch_size=8, description="CPU demo model: D96, depth 6, heads 3, patch 8"),
)
_register(
    "vit_nano",
    ViTSpec(32, 2, 2, patch_size=8, description="test model: D32, depth 2, heads 2, patch 8"),
    aliases=("vit_nano_patch8",),
)


def build_backbone(
    name: str,
    img_size: IntPair = (256, 128),
    stride: Optional[IntPair] = 16,
    num_cameras: int = 0,
    sie_coef: float = 3.0,
    drop_path: float = 0.1,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    pretrained: Optional[str] = None,
    fused_attn: bool = True,
    grad_checkpointing: bool = False,
) -> ViTBackbone:
    """Build a registered ViT variant (``BACKBONES.names()``), optionally with weights.

    Args:
        name: variant, e.g. ``"vit_base_patch16"``, ``"deit_small_patch16"``, ``"vit_nano"``.
        img_size: (H, W) of the inputs.
        stride: patch stride (int or (sy, sx)); ``None`` means the variant's patch size.
        num_cameras: training cameras for SIE (SIE is created only when > 1).
        pretrained: ``None``; a local checkpoint file (jx flat dict, DeiT ``{'model': ...}``,
            ``{'state_dict': ...}``, timm checkpoint); or ``"timm:<model name>"`` to take
            timm's pretrained weights (needs internet or a populated HF cache). Loaded
            strictly with :func:`occreid.models.pretrained.load_pretrained`.
        grad_checkpointing: activation checkpointing of the blocks in training
            (:meth:`ViTBackbone.set_grad_checkpointing`).
        Other arguments: see :class:`ViTBackbone`.
    """
    spec: ViTSpec = BACKBONES.get(name)  # unknown name: OccReIDError with "did you mean"
    model = ViTBackbone(
        img_size=img_size,
        patch_size=spec.patch_size,
        stride=stride,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=spec.qkv_bias,
        qk_scale=spec.qk_scale,
        num_cameras=num_cameras,
        sie_coef=sie_coef,
        drop_path=drop_path,
        drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
        fused_attn=fused_attn,
    )
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if pretrained:
        report = load_pretrained(model, pretrained, strict=True)
        logger.info("loaded pretrained weights into %s: %s", name, report.summary())
    return model
