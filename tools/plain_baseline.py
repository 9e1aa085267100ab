"""A plain tiny-ViT ReID baseline: the yardstick for occreid's tiny recipes (issue #13).

Independent of occreid's trainer, model and transforms: timm's VisionTransformer, a BNNeck,
cross-entropy + soft-margin batch-hard triplet, flip + pad-crop on in-memory tensors, PK
batches, AdamW with a per-iteration one-cycle schedule. Only the dataset listing
(``occreid.data.build_dataset``, which reads SynthOcc's occlusion metadata) and the evaluator
(``occreid.evaluation``) come from occreid. Prints mAP / R1 per query occlusion group, for the
feature before and after the BNNeck.

    OMP_NUM_THREADS=1 python tools/plain_baseline.py --root data/SynthOcc --epochs 12

``--keep-rows A:B`` trains and tests on the image rows A..B-1 only (the rest is set to the
mean colour): how much identity information one horizontal stripe carries.
``--schedule epoch`` steps the same one-cycle shape once per epoch instead (ablation).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from occreid.data import build_dataset
from occreid.evaluation import compute_distance, evaluate_rank

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load(records, size):
    """All images of a split as one normalised float tensor [N, 3, H, W]."""
    h, w = size
    arr = np.stack([np.asarray(Image.open(r.path).convert("RGB").resize((w, h), Image.BILINEAR))
                    for r in records])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
    return (x - MEAN) / STD


def keep_rows(x, rows):
    """Zero (= mean colour after normalisation) every row outside ``rows``."""
    if rows is None:
        return x
    out = torch.zeros_like(x)
    out[:, :, rows[0]:rows[1]] = x[:, :, rows[0]:rows[1]]
    return out


def augment(x, pad):
    """Random horizontal flip, then zero-pad by ``pad`` and random-crop back, per image."""
    n, _, h, w = x.shape
    flip = torch.rand(n) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,))
    dx = torch.randint(0, 2 * pad + 1, (n,))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def pk_batches(pids, p, k, gen):
    """One epoch of PK batches: each identity's images in shuffled chunks of k (topped up by
    resampling), chunks of distinct identities packed p at a time."""
    by_pid = {}
    for i, pid in enumerate(pids):
        by_pid.setdefault(pid, []).append(i)
    chunks = {}
    for pid, idx in by_pid.items():
        idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        if len(idx) < k:
            idx += [idx[j] for j in torch.randint(len(idx), (k - len(idx),), generator=gen).tolist()]
        chunks[pid] = [idx[j:j + k] for j in range(0, len(idx) - k + 1, k)]
    batches = []
    while len([q for q in chunks if chunks[q]]) >= p:
        live = [q for q in chunks if chunks[q]]
        pick = [live[j] for j in torch.randperm(len(live), generator=gen)[:p].tolist()]
        batches.append([i for q in pick for i in chunks[q].pop()])
    return batches


def soft_triplet(feat, labels):
    """Batch-hard triplet with the soft margin log(1 + exp(d_ap - d_an)), Euclidean distance."""
    d = torch.cdist(feat, feat).clamp_min(1e-12)
    same = labels[:, None] == labels[None, :]
    d_ap = (d * same).max(1).values
    d_an = (d + same * 1e6).min(1).values
    return F.softplus(d_ap - d_an).mean()


class Net(nn.Module):
    def __init__(self, num_classes, args):
        super().__init__()
        if args.backbone == "timm":
            self.vit = VisionTransformer(img_size=tuple(args.size), patch_size=args.patch,
                                         embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                                         num_classes=0, global_pool="token")
        else:  # bisection aid: occreid's registered backbone (its init), cls token after the norm
            from occreid.models.backbone import build_backbone
            vit = build_backbone(args.backbone, img_size=tuple(args.size), stride=args.patch,
                                 drop_path=0.0)
            self.vit = lambda x: vit(x)[:, 0]
            self.occreid_vit = vit
        self.bn = nn.BatchNorm1d(args.dim)
        self.bn.bias.requires_grad_(False)
        self.fc = nn.Linear(args.dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, std=0.001)

    def forward(self, x):
        f = self.vit(x)
        b = self.bn(f)
        return f, b, self.fc(b)


@torch.no_grad()
def features(net, x, bs=256):
    net.eval()
    out = [net(x[i:i + bs])[:2] for i in range(0, len(x), bs)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def evaluate(net, q, g, qrec, grec):
    res = {}
    (qf_pre, qf_post), (gf_pre, gf_post) = features(net, q), features(net, g)
    qp, qc = np.array([r.pid for r in qrec]), np.array([r.camid for r in qrec])
    gp, gc = np.array([r.pid for r in grec]), np.array([r.camid for r in grec])
    occ = np.array([r.occlusion or "unknown" for r in qrec])
    groups = {"all": occ == occ, "holistic": occ == "holistic", "npo": occ == "npo",
              "ntp": occ == "ntp", "occluded": (occ == "npo") | (occ == "ntp")}
    for name, (qf, gf) in (("before_bn", (qf_pre, gf_pre)), ("after_bn", (qf_post, gf_post))):
        dist = compute_distance(qf, gf, "cosine", normalize=True).numpy()
        for grp, m in groups.items():
            if m.sum() == 0:
                continue
            r = evaluate_rank(dist[m], qp[m], gp, qc[m], gc)
            res[f"{name}/{grp}"] = (100 * float(r["mAP"]), 100 * float(r["cmc"][0]), int(m.sum()))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--dataset", default="synthocc", help="occreid dataset name (Market layout)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3, help="one-cycle peak learning rate")
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--schedule", choices=("iter", "epoch"), default="iter")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--triplet-weight", type=float, default=1.0)
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(128, 64))
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--backbone", default="timm",
                    help="timm (default) or an occreid BACKBONES name, e.g. vit_mini_patch16")
    ap.add_argument("--pad", type=int, default=6)
    ap.add_argument("--keep-rows", default=None, help="A:B, train and test on rows A..B-1 only")
    ap.add_argument("--data", choices=("plain", "occreid"), default="plain",
                    help="occreid: batches from occreid's RandomIdentitySampler and train "
                         "transform (bisection aid; the loop, model and losses stay plain)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows = tuple(int(v) for v in args.keep_rows.split(":")) if args.keep_rows else None

    t0 = time.time()
    ds = build_dataset(args.dataset, args.root)
    size = tuple(args.size)
    xtr = keep_rows(load(ds.train, size), rows)
    q, g = keep_rows(load(ds.query, size), rows), keep_rows(load(ds.gallery, size), rows)
    pids = [r.pid for r in ds.train]
    ytr = torch.tensor(pids)
    net = Net(int(ytr.max()) + 1, args)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.wd)
    steps_per_epoch = len(pk_batches(pids, args.p, args.k, torch.Generator().manual_seed(0)))
    total = steps_per_epoch * args.epochs if args.schedule == "iter" else args.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total + 1,
                                                pct_start=0.15)
    print(f"train {len(xtr)} images / {len(set(pids))} ids, query {len(q)}, gallery {len(g)}; "
          f"~{steps_per_epoch} steps/epoch; loaded in {time.time() - t0:.0f} s", flush=True)
    if args.data == "occreid":
        from occreid.data.image_dataset import ImageDataset
        from occreid.data.sampler import RandomIdentitySampler
        from occreid.data.transforms import build_train_transform
        sampler = RandomIdentitySampler(pids, args.p * args.k, args.k, seed=args.seed)
        loader = torch.utils.data.DataLoader(
            ImageDataset(ds.train, build_train_transform(
                size, padding=args.pad, re_prob=0.0, mean=MEAN.flatten().tolist(),
                std=STD.flatten().tolist())),
            batch_size=args.p * args.k, sampler=sampler, drop_last=True, num_workers=0)

    def batches(epoch):
        if args.data == "plain":
            for idx in pk_batches(pids, args.p, args.k, gen):
                yield augment(xtr[idx], args.pad), ytr[idx]
        else:
            sampler.set_epoch(epoch)
            for b in loader:
                yield keep_rows(b["images"], rows), b["pids"]

    for epoch in range(args.epochs):
        net.train()
        ce_sum = tri_sum = n = 0
        for x, y in batches(epoch):
            f, _, logits = net(x)
            ce = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            tri = soft_triplet(f, y)
            opt.zero_grad(set_to_none=True)
            (ce + args.triplet_weight * tri).backward()
            opt.step()
            if args.schedule == "iter":
                sched.step()
            ce_sum, tri_sum, n = ce_sum + ce.item(), tri_sum + tri.item(), n + 1
        if args.schedule == "epoch":
            sched.step()
        # spread: mean per-channel std of the pre-BN feature over the batch, against the
        # mean |channel mean|; a small ratio = the feature collapsed onto a constant offset
        spread = f.detach().std(0).mean().item() / f.detach().mean(0).abs().mean().item()
        print(f"epoch {epoch + 1}: ce {ce_sum / n:.3f} tri {tri_sum / n:.3f} spread {spread:.3f} "
              f"lr {opt.param_groups[0]['lr']:.2e} ({time.time() - t0:.0f} s)", flush=True)
    res = evaluate(net, q, g, ds.query, ds.gallery)
    for key, (m, r1, nq) in res.items():
        print(f"{key:22s} mAP {m:5.1f}  R1 {r1:5.1f}  ({nq} queries)")
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": res, "seconds": time.time() - t0}, fh, indent=1)


if __name__ == "__main__":
    main()
