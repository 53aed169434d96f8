"""A small MQTT 3.1.1 broker in Python (amqtt), for ``csi demo`` where no Mosquitto is installed.

    python -m csi_cloud.embedded_broker --port 1883

Anonymous, loopback only, no persistence: a demo broker, not a production one (it has no
MQTT 5, so the demo's clients fall back to MQTT 3.1.1 without shared subscriptions).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

__all__ = ["serve"]


async def serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                    {"allow_anonymous": True}},
    })
    await broker.start()
    print(f"embedded broker listening on {host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
