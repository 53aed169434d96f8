"""Which worker should hold which partition: the live workers and a balanced assignment.

Every worker announces itself (and the partitions it holds) on a core subject once a second;
a worker not heard from for ``timeout_s`` is gone. Each worker computes the same assignment
from the same set of live workers (:func:`assign`), bids for the partitions assigned to it and
hands back the others. The assignment only steers: which worker actually receives a
partition's segments is decided by the NATS server's pin (one pinned client per consumer), so
two workers that briefly disagree on the live set never both receive a partition.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Membership", "Peer", "assign"]


def _rank(worker: str, partition: int) -> bytes:
    return hashlib.blake2b(f"{worker}\x00{partition}".encode(), digest_size=8).digest()


def assign(partitions: int, workers: Iterable[str]) -> dict[str, frozenset[int]]:
    """Partitions per worker: every partition to exactly one worker, the counts differing by
    at most one, each partition preferring the workers that rank it highest (rendezvous
    hashing), so a worker joining or leaving moves few partitions."""
    names = sorted(set(workers))
    if not names:
        return {}
    base, extra = divmod(partitions, len(names))
    owned: dict[str, set[int]] = {w: set() for w in names}
    preference = {p: sorted(names, key=lambda w, p=p: _rank(w, p), reverse=True)
                  for p in range(partitions)}
    left = []
    for p in range(partitions):  # every worker up to the floor share, by preference
        for w in preference[p]:
            if len(owned[w]) < base:
                owned[w].add(p)
                break
        else:
            left.append(p)
    grown: set[str] = set()
    for p in left:  # the remainder: one more each for `extra` workers
        w = next(w for w in preference[p] if w not in grown)
        owned[w].add(p)
        grown.add(w)
    del extra  # == len(left) when there is a floor share: each grown worker took one
    return {w: frozenset(ps) for w, ps in owned.items()}


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
