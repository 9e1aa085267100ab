"""Tests for occreid.data.RandomIdentitySampler (PK sampling, determinism, DDP shares)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from occreid.data import RandomIdentitySampler

# 9 identities with 1..9 images each, interleaved in dataset order; ids are not contiguous.
RAW_IDS = [3, 10, 11, 25, 40, 41, 57, 60, 99]
PIDS = [pid for rep in range(9) for i, pid in enumerate(RAW_IDS) if rep <= i]


def reference_epoch(pids, batch_size, num_instances, seed, epoch):
    """Plain-loop version of the sampler's algorithm, consuming the same random numbers."""
    rng = np.random.default_rng([seed, epoch])
    K, P = num_instances, batch_size // num_instances
    ids = sorted(set(pids))
    groups = {p: [i for i, q in enumerate(pids) if q == p] for p in ids}
    # Draws with replacement for small identities (one call, ids in ascending order).
    small = [p for p in ids if len(groups[p]) < K]
    highs = [len(groups[p]) for p in small for _ in range(K)]
    draws = rng.integers(0, np.array(highs, dtype=np.int64)) if highs else []
    pool = {p: list(groups[p]) for p in ids if len(groups[p]) >= K}
    for j, p in enumerate(small):
        pool[p] = [groups[p][int(d)] for d in draws[j * K:(j + 1) * K]]
    # Random keys: big identities first (ascending id), then small ones, as the sampler lays
    # out its pool; shuffle each identity by sorting on its keys.
    order = [p for p in ids if p not in small] + small
    keys = rng.random(sum(len(pool[p]) for p in order))
    k = 0
    chunks = {}
    for p in order:
        items = pool[p]
        ks = keys[k:k + len(items)]
        k += len(items)
        shuffled = [items[i] for i in sorted(range(len(items)), key=lambda i: ks[i])]
        chunks[p] = [shuffled[i:i + K] for i in range(0, len(shuffled) - K + 1, K)]
    out = []
    while True:
        avail = [i for i, p in enumerate(ids) if chunks[p]]
        if len(avail) < P:
            break
        for i in rng.choice(np.array(avail), P, replace=False):
            out.extend(chunks[ids[i]].pop(0))
    return out


@pytest.mark.parametrize("batch_size,k", [(6, 2), (8, 4), (9, 3), (4, 1)])
@pytest.mark.parametrize("epoch", [0, 3])
def test_matches_plain_reference(batch_size, k, epoch):
    s = RandomIdentitySampler(PIDS, batch_size=batch_size, num_instances=k, seed=5)
    s.set_epoch(epoch)
    got = list(s)
    assert got == reference_epoch(PIDS, batch_size, k, 5, epoch)
    assert len(got) == len(s) == s.num_batches * batch_size


@pytest.mark.parametrize("seed", range(4))
def test_batches_are_p_ids_times_k(seed):
    k, bs = 3, 9
    pids = np.array(PIDS)
    s = RandomIdentitySampler(PIDS, batch_size=bs, num_instances=k, seed=seed)
    idx = np.array(list(s))
    assert len(idx) % bs == 0 and len(idx) > 0
    batches = pids[idx].reshape(-1, bs // k, k)
    # every group of K is one identity, and the P identities of a batch are distinct
    assert (batches == batches[:, :, :1]).all()
    for b in batches[:, :, 0]:
        assert len(set(b.tolist())) == bs // k
    # identities with >= K images are sampled without replacement within the epoch
    counts = {p: PIDS.count(p) for p in RAW_IDS}
    for p in RAW_IDS:
        used = idx[pids[idx] == p]
        if counts[p] >= k:
            assert len(set(used.tolist())) == len(used)
            assert len(used) <= counts[p] - counts[p] % k
        assert set(used.tolist()) <= {i for i, q in enumerate(PIDS) if q == p}


def test_identities_with_fewer_than_k_images_are_upsampled():
    # ids 0 and 1 have 1 and 2 images, K = 4; with P = 2 and 2 ids they appear every batch
    pids = [0, 1, 1]
    s = RandomIdentitySampler(pids, batch_size=8, num_instances=4, seed=0)
    idx = list(s)
    assert len(idx) == 8 and s.num_batches == 1
    groups = {tuple(sorted(idx[:4])), tuple(sorted(idx[4:]))}
    assert (0, 0, 0, 0) in groups
    other = next(g for g in groups if g != (0, 0, 0, 0))
    assert set(other) <= {1, 2} and len(other) == 4


def test_determinism_across_instances_and_epochs():
    a = RandomIdentitySampler(PIDS, batch_size=6, num_instances=2, seed=1)
    b = RandomIdentitySampler(PIDS, batch_size=6, num_instances=2, seed=1)
    c = RandomIdentitySampler(PIDS, batch_size=6, num_instances=2, seed=2)
    assert list(a) == list(b)
    assert list(a) != list(c)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e1 != e0
    b.set_epoch(1)
    assert list(b) == e1
    a.set_epoch(0)
    assert list(a) == e0  # an epoch's list is a pure function of (seed, epoch)
    np.testing.assert_array_equal(a.global_indices(1), e1)


@pytest.mark.parametrize("replicas", [2, 3])
def test_rank_shares_rebuild_single_process_batches(replicas):
    k, bs = 2, 6 if replicas == 3 else 8
    single = RandomIdentitySampler(PIDS, batch_size=bs, num_instances=k, seed=3)
    ranks = [
        RandomIdentitySampler(PIDS, batch_size=bs, num_instances=k, seed=3,
                              num_replicas=replicas, rank=r)
        for r in range(replicas)
    ]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        full = np.array(list(single)).reshape(-1, bs)
        share = bs // replicas
        local = [np.array(list(s)).reshape(-1, share) for s in ranks]
        for s, loc in zip(ranks, local):
            assert len(s) == loc.size == single.num_batches * share
            assert s.num_batches == single.num_batches
        np.testing.assert_array_equal(np.concatenate(local, axis=1), full)
        # shares are disjoint positions of each batch: identities do not overlap across ranks
        pids = np.array(PIDS)
        for b in range(full.shape[0]):
            sets = [set(pids[loc[b]].tolist()) for loc in local]
            assert sum(len(x) for x in sets) == len(set().union(*sets)) == bs // k


def test_default_replicas_from_torch_distributed(monkeypatch):
    s = RandomIdentitySampler(PIDS, batch_size=8, num_instances=2)
    assert (s.num_replicas, s.rank) == (1, 0)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    s = RandomIdentitySampler(PIDS, batch_size=8, num_instances=2)
    assert (s.num_replicas, s.rank) == (2, 1)
    assert len(list(s)) == len(s) == s.num_batches * 4


class _Items(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": i, "pids": PIDS[i]}


def test_dataloader_usage():
    s = RandomIdentitySampler(PIDS, batch_size=8, num_instances=2, seed=0, num_replicas=2, rank=0)
    loader = DataLoader(_Items(len(PIDS)), batch_size=4, sampler=s, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == s.num_batches
    flat = torch.cat([b["index"] for b in batches]).tolist()
    assert flat == list(s)
    for b in batches:
        p = b["pids"].view(2, 2)
        assert (p[:, 0] == p[:, 1]).all() and p[0, 0] != p[1, 0]


def test_numpy_and_tensor_pids():
    a = RandomIdentitySampler(PIDS, batch_size=6, num_instances=2)
    b = RandomIdentitySampler(np.array(PIDS), batch_size=6, num_instances=2)
    c = RandomIdentitySampler(torch.tensor(PIDS), batch_size=6, num_instances=2)
    assert list(a) == list(b) == list(c)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=7, num_instances=2), "multiple of num_instances"),
        (dict(batch_size=12, num_instances=4, num_replicas=2, rank=0), "multiple of num_instances"),
        (dict(batch_size=40, num_instances=4), "fewer than the 10"),
        (dict(batch_size=8, num_instances=0), "num_instances"),
        (dict(batch_size=0, num_instances=2), "batch_size"),
        (dict(batch_size=8, num_instances=2, num_replicas=2, rank=2), "rank"),
        (dict(batch_size=8, num_instances=2, seed=-1), "seed"),
    ],
)
def test_bad_configurations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomIdentitySampler(PIDS, **kwargs)


def test_empty_pids_and_bad_epoch():
    with pytest.raises(ValueError, match="non-empty"):
        RandomIdentitySampler([], batch_size=4, num_instances=2)
    s = RandomIdentitySampler(PIDS, batch_size=4, num_instances=2)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
