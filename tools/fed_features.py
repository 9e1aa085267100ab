"""Evaluate a trained FED checkpoint with each feature it can produce (a diagnosis aid).

    python tools/fed_features.py outputs/ablations/runs/fed/seed0/model_final.pth

Prints mAP (all / holistic / NPO / NTP / occluded) for: the official retrieval feature f'
(OEM-weighted, BNNeck'd parts), the same parts without the OEM weights, each single part, f'
without the top stripe, the
"global" token the official code classifies (the first patch token), the cls token, and the
FDM ("reconstructed") feature. Cosine distance on L2-normalised features throughout.

Then the OEM check (issue #13): 128 training images get FED's NPO view (the dataset's own
occluder bank, the official stripe labels), and the script prints the OEM's mean score on
occluded and on visible stripes, and the held-out accuracy of a logistic-regression probe
that reads the occlusion label off the pooled part features (with the majority rate beside
it). A probe at the majority rate means the part features hold no trace of which stripe is
covered, so no OEM can learn to erase it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from occreid.engine.build import build_datasets, build_test_loader, model_from_checkpoint
from occreid.engine.checkpoint import load_checkpoint
from occreid.data.npo import NPOTransform, find_occluder_folder, stripe_mask
from occreid.evaluation.extract import extract_features
from occreid.utils import read_image

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


    oem_check(fed, cfg, [r.path for r in test_ds.train][:256:2])


@torch.no_grad()
def _scores_and_parts(fed, images):
    _, parts = fed._parts(images, None)
    _, scores = fed._erase(parts)
    return scores, parts


def oem_check(fed, cfg, paths) -> None:
    torch.manual_seed(0)
    size = tuple(cfg["data"]["size_train"])
    root = Path(paths[0]).parent.parent  # <dataset>/bounding_box_train/x.jpg
    npo = NPOTransform(find_occluder_folder(root), size=size, generator=torch.Generator().manual_seed(0))
    x = torch.stack([npo(read_image(p)) for p in paths])
    mask = stripe_mask(x[:, 6], fed.num_parts)
    s_clean, p_clean = _scores_and_parts(fed, x[:, :3])
    s_occ, p_occ = _scores_and_parts(fed, x[:, 3:6])
    occ, vis = mask == 0, mask == 1
    print(f"OEM on {len(paths)} NPO training views: mean score on occluded stripes "
          f"{s_occ[occ].mean():.3f}, on visible stripes {s_occ[vis].mean():.3f}, clean views "
          f"{s_clean.mean():.3f}")
    # logistic-regression probe: occluded or not, from the pooled part feature (+ stripe index)
    feats = torch.cat([p_clean, p_occ]).flatten(0, 1)
    labels = torch.cat([torch.ones_like(mask), mask]).flatten()
    stripe = torch.arange(fed.num_parts).repeat(2 * len(paths))
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    X = torch.cat([z, F.one_hot(stripe, fed.num_parts).float()], 1)
    order = torch.randperm(len(X))
    tr, te = order[: len(X) // 2], order[len(X) // 2 :]
    w = torch.zeros(X.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(X[tr] @ w, labels[tr]) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    acc = ((X[te] @ w > 0).float() == labels[te]).float().mean().item()
    major = max(labels[te].mean().item(), 1 - labels[te].mean().item())
    print(f"linear probe of the occlusion label from the part features: {100 * acc:.1f} % "
          f"held-out accuracy (majority label {100 * major:.1f} %)")


if __name__ == "__main__":
    main(sys.argv[1])
