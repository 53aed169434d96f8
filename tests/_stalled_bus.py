"""A worker's bus that takes segments and never stores them (tests/test_workers.py).

Killed with SIGKILL, it leaves every delivery it got outstanding, as a worker far behind does
when it dies: JetStream redelivers them to the partition's next holder. It prints how many
segments it has taken, every 10.

    python tests/_stalled_bus.py nats://127.0.0.1:4222 PARTITIONS NAME
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csi_cloud.bus import NatsBus, SegmentSubjects

PIN_TTL_S = 4.0
ACK_WAIT_S = 3.0


class _NeverStored:
    def __init__(self) -> None:
        self.count = 0

    def submit(self, site: str, ap: str, payload: bytes, received: float,
               ack: Callable[[], None] | None = None) -> None:
        self.count += 1
        if self.count % 10 == 0:
            print(f"taken {self.count}", flush=True)

    def reload_aps(self, keep: Callable[[str, str], bool]) -> int:
        return 0


async def main(servers: str, partitions: int, name: str) -> None:
    bus = NatsBus(servers.split(","), _NeverStored(), name=name,
                  subjects=SegmentSubjects("csi/v1", partitions), pin_ttl_s=PIN_TTL_S,
                  ack_wait_s=ACK_WAIT_S)
    await bus.start()
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
