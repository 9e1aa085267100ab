"""PK identity sampler (P identities x K instances per batch), deterministic and DDP-aware.

The epoch's global index list follows TransReID's ``RandomIdentitySampler``
(transreid-backbone.md section 4.5):

1. every identity's image list is shuffled; an identity with fewer than K images is first
   replaced by K draws with replacement from its images; the list is cut into chunks of K and a
   remainder shorter than K is dropped;
2. while at least P = batch_size / K identities still have chunks, P distinct identities are
   drawn uniformly and each contributes its next chunk; the P*K indices form one batch.

Differences from the official code, none of which changes the distribution of batches:

* the randomness comes from a ``numpy.random.Generator`` seeded with ``(seed, epoch)``, so an
  epoch's list is a pure function of those two numbers (resumed runs repeat it exactly, and all
  processes of a distributed run agree without communicating);
* step 1 is vectorised over identities; only step 2 loops, once per batch;
* distributed: every rank computes the same global list and rank r takes the r-th contiguous
  share of each global batch, so W processes together see exactly the 1-process batches
  (TransReID's DDP sampler draws a different sequence instead).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["RandomIdentitySampler"]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class RandomIdentitySampler(Sampler[int]):
    """Yields dataset indices so that every ``batch_size`` consecutive global indices hold
    P = ``batch_size / num_instances`` distinct identities with ``num_instances`` images each.

    Args:
        pids: the identity label of every dataset item (e.g. ``[r.pid for r in ds.train]``).
        batch_size: global batch size, summed over all processes (TransReID: 64).
        num_instances: K, images per identity in a batch (TransReID: 4).
        seed: base seed; the epoch list depends only on ``(seed, epoch)``.
        num_replicas: number of processes; defaults to the initialised ``torch.distributed``
            world size, else 1.
        rank: this process's rank; defaults to ``torch.distributed``'s rank, else 0.

    Use it with ``DataLoader(dataset, batch_size=batch_size // num_replicas, sampler=sampler,
    drop_last=True)`` and call :meth:`set_epoch` before every epoch (as with
    ``DistributedSampler``; otherwise every epoch repeats the list of epoch 0).

    ``len(sampler)`` is the exact number of indices this rank yields in the current epoch, and
    :attr:`num_batches` the number of global batches; both vary slightly from epoch to epoch.
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int = 64,
        num_instances: int = 4,
        seed: int = 0,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        batch_size = _check_int("batch_size", batch_size, 1)
        num_instances = _check_int("num_instances", num_instances, 1)
        self.seed = _check_int("seed", seed, 0)
        if num_replicas is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            if num_replicas is None:
                num_replicas = dist.get_world_size() if initialised else 1
            if rank is None:
                rank = dist.get_rank() if initialised else 0
        num_replicas = _check_int("num_replicas", num_replicas, 1)
        rank = _check_int("rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
        unit = num_instances * num_replicas
        if batch_size % unit != 0:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of num_instances x num_replicas "
                f"({num_instances} x {num_replicas} = {unit}), so that every process gets whole "
                f"groups of {num_instances} images per identity. Try batch_size="
                f"{unit * max(1, round(batch_size / unit))}."
            )
        pid_arr = np.asarray(pids)
        if pid_arr.ndim != 1 or pid_arr.size == 0:
            raise ValueError(f"pids must be a non-empty 1-D sequence, got shape {pid_arr.shape}")

        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances  # P
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

        # Group dataset indices by identity, keeping dataset order inside each group.
        _, dense = np.unique(pid_arr, return_inverse=True)  # dense id in 0..C-1
        dense = dense.reshape(-1)
        self.num_identities = int(dense.max()) + 1
        if self.num_identities < self.num_pids_per_batch:
            raise ValueError(
                f"the dataset has {self.num_identities} identities, fewer than the "
                f"{self.num_pids_per_batch} a batch needs (batch_size {batch_size} / "
                f"num_instances {num_instances}). Lower batch_size or num_instances."
            )
        self._counts = np.bincount(dense, minlength=self.num_identities)  # images per id
        self._by_pid = np.argsort(dense, kind="stable")  # dataset indices grouped by id
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        self._cache: Optional[tuple] = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose list the next iteration yields."""
        self.epoch = _check_int("epoch", epoch, 0)

    # -- the global epoch list ------------------------------------------------------------

    def _build(self, epoch: int) -> np.ndarray:
        """Global index list of ``epoch``: int64 array of length num_batches * batch_size."""
        rng = np.random.default_rng([self.seed, epoch])
        K, P = self.num_instances, self.num_pids_per_batch
        counts, by_pid, starts = self._counts, self._by_pid, self._starts
        elem_pid = np.repeat(np.arange(self.num_identities), counts)  # id of each by_pid entry

        # Step 1a: identities with < K images -> K draws with replacement from their images.
        small = counts < K
        big = ~small[elem_pid]
        small_pid = np.repeat(np.flatnonzero(small), K)
        small_idx = by_pid[starts[small_pid] + rng.integers(0, counts[small_pid])]
        pool_idx = np.concatenate([by_pid[big], small_idx])
        pool_pid = np.concatenate([elem_pid[big], small_pid])

        # Step 1b: shuffle inside each identity (sort by id, then by a random key).
        order = np.lexsort((rng.random(pool_idx.size), pool_pid))
        pool_idx, pool_pid = pool_idx[order], pool_pid[order]

        # Step 1c: chunks of K; drop each identity's remainder. n' = max(n, K), m = n' // K.
        n_prime = np.maximum(counts, K)
        num_chunks = n_prime // K
        pool_start = np.concatenate([[0], np.cumsum(n_prime)[:-1]])
        pos = np.arange(pool_idx.size) - pool_start[pool_pid]
        chunks = pool_idx[pos < (num_chunks * K)[pool_pid]].reshape(-1, K)  # [sum m, K]
        chunk_start = np.concatenate([[0], np.cumsum(num_chunks)[:-1]])

        # Step 2: while >= P identities have chunks left, draw P of them and pop one chunk each.
        remaining = num_chunks.copy()
        batches = []
        while True:
            avail = np.flatnonzero(remaining)
            if avail.size < P:
                break
            sel = rng.choice(avail, P, replace=False)
            batches.append(chunks[chunk_start[sel] + num_chunks[sel] - remaining[sel]].reshape(-1))
            remaining[sel] -= 1
        return np.concatenate(batches).astype(np.int64)

    def global_indices(self, epoch: Optional[int] = None) -> np.ndarray:
        """The global (all-rank) index list of ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._build(epoch))
        return self._cache[1]

    def local_indices(self, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's share of every global batch of ``epoch``, concatenated."""
        share = self.batch_size // self.num_replicas
        batches = self.global_indices(epoch).reshape(-1, self.batch_size)
        return batches[:, self.rank * share:(self.rank + 1) * share].reshape(-1)

    @property
    def num_batches(self) -> int:
        """Number of global batches in the current epoch."""
        return self.global_indices().size // self.batch_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.local_indices().tolist())

    def __len__(self) -> int:
        return self.num_batches * (self.batch_size // self.num_replicas)
