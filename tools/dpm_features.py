"""Evaluate a trained DPM checkpoint with plain and query-masked distances on the pre- and
post-BNNeck features (a diagnosis aid).

    python tools/dpm_features.py outputs/ablations/runs/dpm/seed0/model_final.pth

Prints mAP (all / holistic / NPO / NTP / occluded) for the four combinations, the query
masks' statistics, and how far the BNNeck moves the feature (per-channel |mean| / std of
the pre-BN feature, the BN scale spread), which is what makes a mask learned on the post-BN
feature mean something else on the pre-BN one.
"""

from __future__ import annotations

import sys

import torch

from occreid.engine.build import build_datasets, build_test_loader, model_from_checkpoint
from occreid.engine.checkpoint import load_checkpoint
from occreid.evaluation.extract import extract_features

from _report import print_header, report


def main(path: str) -> None:
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    model = model_from_checkpoint(ckpt)
    if getattr(model, "hmg", None) is None:
        raise SystemExit(f"{path}: not a DPM checkpoint with a masked branch")
    _, test_ds = build_datasets(cfg)
    query, gallery = list(test_ds.query), list(test_ds.gallery)
    nq = len(query)
    groups = [r.occlusion for r in query]
    loader = build_test_loader(cfg, query + gallery)
    model.neck_feat = "before"
    pre = extract_features(model, loader, torch.device("cpu"))
    bn = model.bottleneck
    with torch.no_grad():
        post_feat = bn(pre["feat"].clone())  # eval-mode BNNeck on the same features
    mask = pre["mask"]
    mean, std = pre["feat"].mean(0), pre["feat"].std(0)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    print(f"query masks: mean {mask[:nq].mean():.3f}, std over channels {mask[:nq].std(1).mean():.3f}, "
          f"min {mask[:nq].min():.3f}, max {mask[:nq].max():.3f}")
    mbar = mask[:nq].mean(0)
    for grp in ("holistic", "npo", "ntp"):
        sel = torch.tensor([x == grp for x in groups])
        dev = ((mask[:nq][sel] - mbar).norm(dim=1) / mbar.norm()).mean()
        print(f"  {grp} queries: mean mask {mask[:nq][sel].mean():.3f}, relative distance to the average mask {dev:.3f}")
    print(f"pre-BN feature: per-channel |mean|/std median {float((mean.abs() / std).median()):.2f}; "
          f"BN scale max/min {float(scale.max() / scale.min()):.1f}")
    print_header(22)
    for space, feat in (("pre-BN", pre["feat"]), ("post-BN", post_feat)):
        for masked in (False, True):
            feats = {"feat": feat, "mask": mask, "pids": pre["pids"], "camids": pre["camids"]}
            name = f"{space} {'query mask' if masked else 'cosine'}"
            report(name, 22, feats, nq, groups, model=model if masked else None)


if __name__ == "__main__":
    main(sys.argv[1])
