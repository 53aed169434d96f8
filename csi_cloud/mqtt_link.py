"""The cloud worker's MQTT client: connection loop, subscriptions, message handlers, publishing.

Segment messages come from a subscription to ``{prefix}/+/+/seg`` on a persistent session
(clean start off, session expiry; ``$share/{group}/...`` only when ``shared_subscription`` is
set: Mosquitto does not restore shared subscriptions after a restart) and are handed to the
service with an ``ack`` it calls once their batch is stored, so a worker that dies mid-batch
gets them again from the broker. At most ``mqtt_receive_maximum`` QoS 1 messages are held
received and not yet acknowledged (:class:`_Window`): however fast clients publish, the backlog
stays in the broker, not in this process. Status messages (retained) are parsed bounded
(csi_edge.messages) from validly named APs (csi_edge.names) and handed over as dicts. A
handler error is logged once with the bad value, counted and skipped; the loop reconnects
after any error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from paho.mqtt.enums import MQTTErrorCode

from csi_edge._mqtt import Backoff
from csi_edge.messages import BadMessageError, loads_bounded
from csi_edge.names import is_valid_name
from csi_edge.settings import topic_name

from .homeassistant import discovery_configs
from .metrics import Metrics
from .settings import CloudSettings

__all__ = ["SHOWN", "LogOnce", "MqttLink", "NotConnectedError", "shown"]

log = logging.getLogger("csi_cloud.service")  # one logger for the whole worker

SHOWN = 200  # characters of a bad value quoted in a log line

LogOnce = Callable[..., None]  # CloudService.log_once(key, message, *args, exc=None)


def shown(value: Any) -> str:
    """A value for a log line: repr, cut at 200 characters."""
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "…"


class NotConnectedError(RuntimeError):
    """The worker has no MQTT connection right now."""


class _Window:
    """Receive-side flow control of one worker: at most ``size`` QoS 1 messages received and
    not yet acknowledged. The broker is asked for it (MQTT 5 Receive Maximum), but Mosquitto
    2.0.x does not keep to it: every acknowledgement that arrives in order moves up to the
    in-flight maximum of queued messages into flight, so a fast publisher's whole backlog
    would move into this process (measured: 59,000 messages held in the client's queue). So
    the link enforces it too: while the window is full no packet is read from the socket, and
    TCP backpressure leaves the rest in the broker's session, unacknowledged, nothing lost.

    paho reads for aiomqtt through an event-loop reader; this window replaces that reader with
    one it can take away and give back, and guards paho's packet read so that the read that
    fills the window is the last one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held = 0  # received, not yet acknowledged
        self.peak = 0
        self._reader: tuple[int, Callable[[], None]] | None = None  # the socket's, while paused
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused = False

    def attach(self, client: Any) -> None:
        """Install on a new aiomqtt client (before it connects)."""
        paho = client._client
        self._loop = loop = asyncio.get_running_loop()
        self._reader = None
        read_packet, deliver = paho._packet_read, paho.on_message
        opened, closed = paho.on_socket_open, paho.on_socket_close

        def packet_read() -> Any:
            if self.held >= self.size:
                self._pause()
                return MQTTErrorCode.MQTT_ERR_AGAIN  # "nothing more to read now"
            return read_packet()

        def on_message(c: Any, userdata: Any, message: Any) -> None:
            if message.qos > 0:
                self.held += 1
                self.peak = max(self.peak, self.held)
            deliver(c, userdata, message)

        def readable() -> None:  # what aiomqtt's reader does
            try:
                paho.loop_read()
                while paho._sock is not None and getattr(paho._sock, "pending", None) and \
                        paho._sock.pending() > 0 and self.held < self.size:
                    paho.loop_read()
            except Exception as exc:
                if not client._disconnected.done():
                    client._disconnected.set_exception(exc)

        def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
            opened(c, userdata, sock)  # aiomqtt's reader and housekeeping task ...
            fd = sock.fileno()
            self._reader = (fd, readable)
            # ... replaced by ours once aiomqtt's is added (called from paho's connect thread)
            loop.call_soon_threadsafe(loop.add_reader, fd, readable)
            self._paused = False

        def on_socket_close(c: Any, userdata: Any, sock: Any) -> None:
            self._reader = None  # never given back to a closed (or reused) descriptor
            self._paused = False
            closed(c, userdata, sock)

        paho._packet_read = packet_read
        paho.on_message = on_message
        paho.on_socket_open = on_socket_open
        paho.on_socket_close = on_socket_close

    def _pause(self) -> None:
        if not self._paused and self._reader is not None and self._loop is not None:
            self._loop.remove_reader(self._reader[0])
            self._paused = True

    def release(self) -> None:
        """A message acknowledged: the window opens again if it was full."""
        self.held -= 1
        if self._paused and self.held < self.size and self._reader is not None and \
                self._loop is not None:
            self._paused = False
            self._loop.add_reader(*self._reader)

    def detach(self, client: Any) -> None:
        """The connection is gone: what it left in aiomqtt's queue is dropped (unacknowledged,
        the broker delivers it again) and no longer held."""
        self._reader = None
        self._paused = False
        queue = client._queue
        dropped = queue.qsize()
        while not queue.empty():
            queue.get_nowait()
        self.held -= dropped


class MqttLink:
    """One worker's connection to the broker. ``client`` is the connected aiomqtt client, or
    None while there is none. Segments go to ``on_segment(site, ap, payload, received, ack)``,
    statuses (a dict from a validly named AP) to ``on_status(site, ap, status)``."""

    def __init__(self, settings: CloudSettings, metrics: Metrics, log_once: LogOnce,
                 on_segment: Callable[[str, str, bytes, float, Callable[[], None]], None],
                 on_status: Callable[[str, str, dict[str, Any]], None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.log_once = log_once
        self.on_segment = on_segment
        self.on_status = on_status
        self.client: Any = None
        self.window = _Window(settings.mqtt_receive_maximum)
        metrics.unacked.set_function(lambda: self.window.held)

    async def run(self) -> None:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        settings = self.settings
        broker = settings.broker_address()
        assert broker is not None
        backoff = Backoff(0.5, 5.0)  # well under 10 s: a broker back is used within seconds
        # Every site, or this worker's shard of sites (Mosquitto hands shared-subscription
        # messages out round robin, which would split an AP's context between workers).
        seg_filters = [f"{settings.prefix}/{site}/+/seg" for site in settings.sites] or \
            [f"{settings.prefix}/+/+/seg"]
        # Off by default: Mosquitto does not restore $share subscriptions from its persistence
        # file (edges reconnecting first after a broker restart would have their backlog
        # acknowledged and discarded), and a stale member of the group takes its share of the
        # segments. Several workers: bus=nats:// (docs/scaling.md).
        if settings.shared_subscription:
            seg_filters = [f"$share/{settings.share_group}/{f}" for f in seg_filters]
        if settings.bus_servers():
            seg_filters = []  # segments come from the NATS bus (csi_cloud.bus)
        v5 = settings.mqtt_protocol == "5"
        status_filter = f"{settings.prefix}/+/+/status"
        while True:
            props: Properties | None = None
            session: dict[str, Any] = {"clean_session": False}  # MQTT 3.1.1: kept until ended
            if v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = settings.session_expiry_s
                props.ReceiveMaximum = settings.mqtt_receive_maximum
                session = {"clean_start": False}
            tls = None
            if broker.tls:
                tls = aiomqtt.TLSParameters(ca_certs=str(settings.ca_file)
                                            if settings.ca_file else None)
            client = aiomqtt.Client(
                broker.host, broker.port, username=broker.username, password=broker.password,
                identifier=settings.client_id,
                protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
                properties=props, keepalive=30, tls_params=tls, timeout=10, **session,
                max_inflight_messages=1000)
            # Acknowledge a segment only once its batch is stored (at-least-once end to end):
            # aiomqtt has no switch for it, paho does (its client is aiomqtt's ``_client``).
            client._client.manual_ack_set(True)
            self.window.attach(client)
            try:
                async with client:
                    self.client = client
                    backoff.reset()
                    log.info("connected to %s as %s", broker, settings.client_id)
                    for seg_filter in seg_filters:
                        await client.subscribe(seg_filter, qos=1)
                    await client.subscribe(status_filter, qos=1)
                    async for message in client.messages:
                        self._on_message(client, message)
            except asyncio.CancelledError:
                raise
            except aiomqtt.MqttError as exc:
                delay = backoff.next_delay()
                log.warning("broker %s: %s; retrying in %.1f s", broker, exc, delay)
                self.client = None
                await asyncio.sleep(delay)
            except Exception as exc:  # never ends the loop: reconnect (the session is kept)
                self.metrics.handler_errors.labels("mqtt").inc()
                delay = backoff.next_delay()
                log.exception("MQTT loop failed (%s); reconnecting in %.1f s", shown(exc),
                              delay)
                self.client = None
                await asyncio.sleep(delay)
            finally:
                self.client = None
                self.window.detach(client)

    def _on_message(self, client: Any, message: Any) -> None:
        """One message; whatever it holds, it is acknowledged or queued, and any error is
        logged once with the bad value, counted and skipped."""
        acked = False

        def ack(mid: int = message.mid, qos: int = message.qos) -> None:
            nonlocal acked
            if qos > 0 and not acked:
                acked = True
                self.window.release()
                with contextlib.suppress(Exception):  # a closed connection: broker resends
                    client._client.ack(mid, qos)  # manual acknowledgement is paho's (above)

        try:
            self._dispatch(message, ack)
        except Exception as exc:
            ack()
            self.metrics.handler_errors.labels("message").inc()
            topic = getattr(getattr(message, "topic", None), "value", None)
            self.log_once(f"message:{type(exc).__name__}:{str(topic)[:100]}",
                          "message on %s skipped: %s; payload %s", shown(topic), shown(exc),
                          shown(bytes(message.payload or b"")[:SHOWN]
                                if isinstance(message.payload, bytes | bytearray)
                                else message.payload), exc=exc)

    def _dispatch(self, message: Any, ack: Callable[[], None]) -> None:
        topic = message.topic.value
        parts = topic.split("/")
        prefix_levels = len(self.settings.prefix.split("/"))
        received = time.time()
        if len(parts) != prefix_levels + 3:
            ack()
            return
        site, ap, kind = parts[-3:]
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else \
            str(message.payload or "").encode()
        if kind == "seg":
            self.on_segment(site, ap, bytes(payload), received, ack)
        elif kind == "status":
            ack()
            self.status_message(site, ap, bytes(payload))
        else:
            ack()

    def status_message(self, site: str, ap: str, payload: bytes) -> None:
        """An AP's (retained) status: bounded JSON object from a validly named AP."""
        if not (is_valid_name(site) and is_valid_name(ap)):
            self.metrics.status_rejected.labels("bad_name").inc()
            self.log_once(f"status-name:{site[:80]}/{ap[:80]}", "status of %s/%s rejected: "
                          "not a valid site/AP name", shown(site), shown(ap))
            return
        if not payload:  # a retained status cleared
            return
        try:
            status = loads_bounded(payload)
        except BadMessageError as exc:
            self.metrics.status_rejected.labels("bad_json").inc()
            self.log_once(f"status-json:{site}/{ap}", "%s/%s: status rejected: %s", site, ap,
                          exc)
            return
        if not isinstance(status, dict):
            self.metrics.status_rejected.labels("not_an_object").inc()
            self.log_once(f"status-object:{site}/{ap}", "%s/%s: status is not a JSON object: "
                          "%s", site, ap, shown(status))
            return
        self.on_status(site, ap, status)

    # -- publishing -------------------------------------------------------------------------

    async def send_ctl(self, site: str, ap: str, command: dict[str, Any]) -> None:
        topic_name(site, "site")
        topic_name(ap, "ap")
        if self.client is None:
            raise NotConnectedError("not connected to the MQTT broker")
        await self.client.publish(f"{self.settings.prefix}/{site}/{ap}/ctl",
                                  json.dumps(command), qos=1)

    def publish_predictions(self, events: list[dict[str, Any]]) -> None:
        """The latest prediction of each AP in the batch, retained, QoS 1. Handed to paho
        (aiomqtt's ``_client``) without awaiting each PUBACK (paho keeps them in flight and
        retries); awaiting thousands of acknowledgements a second through aiomqtt costs more
        than the model."""
        client = self.client
        if client is None:
            return
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for event in events:
            latest[(event["site"], event["ap"])] = event
        for (site, ap), event in latest.items():
            client._client.publish(f"{self.settings.prefix}/{site}/{ap}/pred",
                                   json.dumps(event), qos=1, retain=True)

    def announce(self, site: str, ap: str, status: dict[str, Any]) -> None:
        """Home Assistant discovery configs for a newly seen AP (retained, QoS 1; through
        paho, like the predictions: called from a synchronous handler)."""
        client = self.client
        if client is None:
            return
        name = status.get("model_name") if isinstance(status.get("model_name"), str) else None
        for topic, config in discovery_configs(
                self.settings.prefix, site, ap, model_name=name,
                discovery_prefix=self.settings.homeassistant_prefix).items():
            # An empty retained payload removes the entity (and the retained config).
            client._client.publish(topic, b"" if config is None else json.dumps(config), qos=1,
                                   retain=True)
