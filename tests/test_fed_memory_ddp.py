"""The FED memory under torch.distributed: 2 gloo processes on CPU keep identical banks.

Each process holds a different shard of the data (initialisation) and a different share of
the batch (update, of different sizes). After all-reduce / all-gather both banks must equal
the single-process result on the concatenated data.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from occreid.methods.fed.memory import IdentityMemory
from occreid.utils.distributed import all_gather_cat

C, FD = 5, 6


def make_data():
    g = torch.Generator().manual_seed(11)
    init_feats = torch.randn(14, FD, generator=g)
    init_pids = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 2, 2, 4])
    x = torch.randn(9, FD, generator=g)
    pids = torch.tensor([3, 1, 3, 0, 3, 1, 4, 3, 1])  # repeated ids across both shares
    return init_feats, init_pids, x, pids


RULES = ("sequential", "mean")


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for rule in RULES:
            _run_rule(rank, os.path.join(out_dir, rule), rule)
    finally:
        dist.destroy_process_group()


def _run_rule(rank: int, out_dir: str, rule: str) -> None:
    init_feats, init_pids, x, pids = make_data()
    mem = IdentityMemory(C, FD, momentum=0.2, update_rule=rule)
    shard = slice(0, 8) if rank == 0 else slice(8, None)  # uneven init shards
    mem.init_from_features(init_feats[shard], init_pids[shard])
    torch.save(mem.features.clone(), os.path.join(out_dir, f"init{rank}.pt"))
    share = slice(0, 5) if rank == 0 else slice(5, None)  # uneven batch shares
    mem.update(x[share], pids[share])
    gathered = all_gather_cat(pids[share])
    torch.save({"bank": mem.features.clone(), "gathered": gathered}, os.path.join(out_dir, f"upd{rank}.pt"))


def _single(rule: str):
    init_feats, init_pids, x, pids = make_data()
    mem = IdentityMemory(C, FD, momentum=0.2, update_rule=rule)
    mem.init_from_features(init_feats, init_pids)
    init = mem.features.clone()
    mem.update(x, pids)
    return init, mem.features.clone(), pids


def test_two_process_banks_stay_identical(tmp_path):
    for rule in RULES:
        (tmp_path / rule).mkdir()
    # fork: the children inherit the imported modules (spawn would re-import torch and timm)
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    for rule in RULES:
        out = tmp_path / rule
        init_ref, upd_ref, pids = _single(rule)
        r0, r1 = torch.load(out / "upd0.pt"), torch.load(out / "upd1.pt")
        assert torch.equal(r0["bank"], r1["bank"])  # identical on both processes
        assert torch.equal(r0["gathered"], pids)  # rank order = the global batch order
        torch.testing.assert_close(torch.load(out / "init0.pt"), init_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.load(out / "init1.pt"), init_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(r0["bank"], upd_ref, rtol=0, atol=1e-6)
