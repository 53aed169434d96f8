"""Which worker should hold which partition: the live workers and a balanced assignment.

Every worker announces itself (and the partitions it holds) on a core subject once a second;
a worker not heard from for ``timeout_s`` is gone. Each worker computes the same assignment
from the same set of live workers (:func:`assign`), bids for the partitions assigned to it and
hands back the others. The assignment only steers: which worker actually receives a
partition's segments is decided by the NATS server's pin (one pinned client per consumer), so
two workers that briefly disagree on the live set never both receive a partition.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Membership", "Peer", "assign"]


def _rank(worker: str, partition: int) -> bytes:
    return hashlib.blake2b(f"{worker}\x00{partition}".encode(), digest_size=8).digest()


def assign(partitions: int, workers: Iterable[str]) -> dict[str, frozenset[int]]:
    """Partitions per worker: every partition to exactly one worker, the counts differing by
    at most one. Each (worker, partition) pair has a rank (rendezvous hashing); pairs are
    taken best rank first while the worker has room, so a partition stays with the worker
    that ranks it highest unless that one is full, and a worker joining or leaving moves few
    partitions (about partitions / workers, at most twice that)."""
    return dict(_assign(partitions, tuple(sorted(set(workers)))))


@functools.lru_cache(maxsize=64)
def _assign(partitions: int, names: tuple[str, ...]) -> tuple[tuple[str, frozenset[int]], ...]:
    if not names:
        return ()
    base, extra = divmod(partitions, len(names))
    owned: dict[str, set[int]] = {w: set() for w in names}
    pairs = sorted(((_rank(w, p), w, p) for w in names for p in range(partitions)),
                   reverse=True)
    taken: set[int] = set()
    grown = 0  # workers given base + 1 (exactly `extra` of them in the end)
    for _, w, p in pairs:
        if p in taken:
            continue
        n = len(owned[w])
        if n < base or (n == base and grown < extra):
            grown += n == base
            owned[w].add(p)
            taken.add(p)
    return tuple((w, frozenset(ps)) for w, ps in owned.items())


@dataclass
class Peer:
    name: str
    nonce: str
    held: tuple[int, ...]
    seen: float  # monotonic


@dataclass
class Membership:
    """The workers heard from lately (this one always counts)."""

    me: str
    nonce: str
    timeout_s: float
    peers: dict[str, Peer] = field(default_factory=dict)
    clashes: int = 0  # heartbeats from another process with this worker's name

    def heard(self, name: str, nonce: str, held: Sequence[int], leaving: bool = False,
              now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if name == self.me:
            if nonce != self.nonce:
                self.clashes += 1
            return
        if leaving:
            self.peers.pop(name, None)
            return
        self.peers[name] = Peer(name, nonce, tuple(held), now)

    def live(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        for name in [n for n, p in self.peers.items() if now - p.seen > self.timeout_s]:
            del self.peers[name]
        return sorted([self.me, *self.peers])
