"""CRC-16/CCITT-FALSE computed bit by bit, independent of binascii: the wire-format tests check
the codec's CRC against it and seal crafted messages with it."""

from __future__ import annotations


def crc16_bitwise(data: bytes) -> int:
    """CRC-16/CCITT-FALSE the long way (poly 0x1021, init 0xFFFF, no reflection)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def with_crc(body: bytes) -> bytes:
    """``body`` followed by its CRC, as a message ends."""
    return body + crc16_bitwise(body).to_bytes(2, "big")
