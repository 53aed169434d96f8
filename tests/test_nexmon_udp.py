"""Live Nexmon CSI over a real UDP socket: the same frames as reading the capture file."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np

from csi_edge import MalformedPacketError
from csi_edge.frames import CSIFrames
from csi_edge.readers._pcap import read_udp_payloads
from csi_edge.readers.nexmon import LiveStreamFilter, decode_payload, read_nexmon_pcap

MESSY = "fition/getintobed_user4_rm4/getintobed_user4_rm4_24.pcap"


def test_udp_socket_stream_equals_pcap(samples: Path) -> None:
    capture = read_udp_payloads(samples / MESSY)
    garbage = [b"", b"\x11\x11 not csi", b"\x00" * 1042]
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2.0)
    port = receiver.getsockname()[1]

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i, payload in enumerate(capture.payloads):
                if i in (10, 200, 400):
                    sender.sendto(garbage[i // 200], ("127.0.0.1", port))
                sender.sendto(payload, ("127.0.0.1", port))

    thread = threading.Thread(target=send)
    thread.start()
    live = LiveStreamFilter(warmup=100, source=f"udp://127.0.0.1:{port}")
    chunks: list[CSIFrames] = []
    malformed: dict[str, int] = {}
    expected = len(capture.payloads) + len(garbage)
    with receiver:
        for _ in range(expected):
            data = receiver.recv(65535)
            try:
                packets = decode_payload(data, time.time())
            except MalformedPacketError as exc:
                malformed[exc.reason] = malformed.get(exc.reason, 0) + 1
                continue
            out = live.push(packets, [data])
            if out is not None:
                chunks.append(out)
    thread.join()
    assert malformed == {"bad_length": 2, "bad_magic": 1}
    file_frames = read_nexmon_pcap(samples / MESSY)
    csi = np.concatenate([c.csi for c in chunks])
    assert np.array_equal(csi, file_frames.csi)
    assert live.key is not None and live.key.mac_str == file_frames.info.transmitter
    assert live.dropped["other_transmitter"] == file_frames.dropped["other_transmitter"]
    assert live.dropped["retransmission"] == file_frames.dropped["retransmission"]
