"""Shared test fixtures: tiny Market-1501-style folders a tiny ViT can learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = np.array(
    [[230, 30, 30], [30, 200, 40], [40, 60, 230], [240, 220, 30], [200, 40, 200], [30, 210, 220],
     [250, 140, 20], [120, 60, 20], [250, 250, 250], [20, 20, 20]], dtype=np.float32)


def person(top: int, bottom: int, rng: np.random.Generator, h: int = 32, w: int = 16) -> Image.Image:
    """A crude two-colour 'person' with noise and a random horizontal shift."""
    img = np.full((h, w, 3), 110.0) + rng.normal(0, 12, (h, w, 3))
    x0 = int(rng.integers(1, 4))
    img[2 : h // 2, x0 : w - 4 + x0 - 1] = COLOURS[top] + rng.normal(0, 10, 3)
    img[h // 2 : h - 2, x0 : w - 4 + x0 - 1] = COLOURS[bottom] + rng.normal(0, 10, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_market(root: Path, n_train: int = 8, n_test: int = 6, per_id: int = 6, seed: int = 0) -> Path:
    """``root/market1501/{bounding_box_train,query,bounding_box_test}`` with Market file names."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "market1501"
    combos = [(a, b) for a in range(10) for b in range(10) if a != b]
    order = rng.permutation(len(combos))
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (base / split).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        top, bottom = combos[order[i]]
        pid = i + 1
        for k in range(per_id):
            cam = 1 + k % 6
            person(top, bottom, rng).save(base / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg")
    for j in range(n_test):
        top, bottom = combos[order[n_train + j]]
        pid = 100 + j
        person(top, bottom, rng).save(base / "query" / f"{pid:04d}_c1s1_000000_00.jpg")
        for k in range(3):
            person(top, bottom, rng).save(base / "bounding_box_test" / f"{pid:04d}_c{2 + k}s1_{k:06d}_00.jpg")
    # a distractor (pid 0) and a junk image (pid -1) as in the real dataset
    person(0, 9, rng).save(base / "bounding_box_test" / "0000_c2s1_000999_00.jpg")
    person(0, 9, rng).save(base / "bounding_box_test" / "-1_c3s1_000998_00.jpg")
    return base


TINY_OVERRIDES = [
    "model.backbone=vit_nano",
    "model.pretrained=null",
    "model.stride=8",
    "model.drop_path=0.0",
    "data.name=market1501",
    "data.size_train=[32, 16]",
    "data.size_test=[32, 16]",
    "data.padding=2",
    "data.num_workers=0",
    "solver.ims_per_batch=16",
    "solver.base_lr=0.05",
    "solver.warmup_epochs=1",
    "solver.amp=fp32",
    "solver.eval_period=100",
    "device=cpu",
    "progress=off",
]
