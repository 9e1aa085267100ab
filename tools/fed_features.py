"""Evaluate a trained FED checkpoint with each feature it can produce (a diagnosis aid).

    python tools/fed_features.py outputs/ablations/runs/fed/seed0/model_final.pth

Prints mAP (all / holistic / NPO / NTP / occluded) for: the official retrieval feature f'
(OEM-weighted, BNNeck'd parts), the same parts without the OEM weights, each single part, f'
without the top stripe, the
"global" token the official code classifies (the first patch token), the cls token, and the
FDM ("reconstructed") feature. Cosine distance on L2-normalised features throughout.
"""

from __future__ import annotations

import sys

import torch

from occreid.engine.build import build_datasets, build_test_loader, model_from_checkpoint
from occreid.engine.checkpoint import load_checkpoint
from occreid.evaluation.extract import extract_features

from _report import print_header, report


class _Features(torch.nn.Module):
    def __init__(self, fed):
        super().__init__()
        self.fed = fed

    def forward(self, images, cam_ids=None):
        fed = self.fed
        tokens = fed.backbone(images, cam_ids)
        _, parts = fed._parts(images, cam_ids)
        erased, scores = fed._erase(parts)
        out = {
            "feat": fed.part_bn(erased.flatten(1)),  # the official retrieval feature f'
            "parts_no_oem": fed.part_bn(parts.flatten(1)),
            "global_patch1": tokens[:, 1],
            "cls": tokens[:, 0],
            "scores": scores,
        }
        bn = fed.part_bn(parts.flatten(1)).view(len(images), fed.num_parts, -1)
        for i in range(fed.num_parts):
            out[f"part{i}"] = bn[:, i]
        out["parts_wo_top"] = out["feat"].view(len(images), fed.num_parts, -1)[:, 1:].flatten(1)
        if fed.fdm is not None:
            out["fdm"] = fed.forward_features(images, cam_ids, with_fdm=True)["fdm_feat"]
        return out


def main(path: str) -> None:
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    fed = model_from_checkpoint(ckpt)
    _, test_ds = build_datasets(cfg)
    query, gallery = list(test_ds.query), list(test_ds.gallery)
    feats = extract_features(_Features(fed), build_test_loader(cfg, query + gallery), torch.device("cpu"))
    nq = len(query)
    groups = [r.occlusion for r in query]
    scores = feats["scores"][:nq]
    for g in ("holistic", "npo", "ntp"):
        sel = torch.tensor([x == g for x in groups])
        print(f"mean OEM scores per stripe, {g} queries: {[round(v, 3) for v in scores[sel].mean(0).tolist()]}")
    print_header(14)
    for key in [k for k in feats if k not in ("pids", "camids", "index", "scores")]:
        report(key, 14, {"feat": feats[key], "pids": feats["pids"], "camids": feats["camids"]}, nq, groups)


if __name__ == "__main__":
    main(sys.argv[1])
