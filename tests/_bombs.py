"""Hostile recording files: small on disk, declaring far more than they hold."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import h5py

from csi_edge.convert import convert

__all__ = ["hdf5_claiming_frames", "mat_zlib_bomb"]

_BLOCK = 1 << 24  # 16 MiB of zeros per repeated deflate block


def hdf5_claiming_frames(source: Path, path: Path, frames: int) -> Path:
    """A real recording of ``source`` whose datasets and ``committed`` count then claim
    ``frames`` frames: chunked datasets store none of the new ones (HDF5 would fill them in
    as it reads), so the file stays the size of the real recording."""
    convert(source, path, keep_phase=True)
    with h5py.File(path, "r+") as f:
        for name in ("timestamp", "amplitude", "phase", "rssi", "seq"):
            if name in f:
                f[name].resize(frames, axis=0)
        f["committed"][0] = frames
    return path


def _mat_header() -> bytes:
    text = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 1970"
    return text.ljust(116, b" ") + bytes(8) + struct.pack("<H", 0x0100) + b"IM"


def _element(mdtype: int, data: bytes) -> bytes:
    return struct.pack("<II", mdtype, len(data)) + data + bytes(-len(data) % 8)


def mat_zlib_bomb(path: Path, packets: int) -> Path:
    """A MAT v5 file whose one compressed variable ``CSIamp`` (342 x ``packets`` doubles,
    all zero) inflates to about 2.7 KiB per packet: 600,000 packets are ~1.6 GB from about
    1.6 MB on disk. Built from one deflate block of zeros repeated (each ends with a full
    flush, so the copies are identical), not by compressing gigabytes here."""
    data_bytes = 342 * packets * 8
    flags = _element(6, struct.pack("<II", 6, 0))  # miUINT32: mxDOUBLE_CLASS, no flags
    dims = _element(5, struct.pack("<ii", 342, packets))  # miINT32
    name = _element(1, b"CSIamp")  # miINT8
    body = flags + dims + name + struct.pack("<II", 9, data_bytes)  # miDOUBLE tag, then data
    matrix_head = struct.pack("<II", 14, len(body) + data_bytes) + body  # miMATRIX
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [deflate.compress(matrix_head) + deflate.flush(zlib.Z_FULL_FLUSH)]
    zeros = bytes(_BLOCK)
    whole, rest = divmod(data_bytes, _BLOCK)
    checksum = zlib.adler32(matrix_head)
    if whole:
        block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
        if whole > 1:
            again = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
            assert block == again, "deflate output after a full flush is not reproducible"
        parts += [block] * whole
        for _ in range(whole):
            checksum = zlib.adler32(zeros, checksum)
    parts.append(deflate.compress(bytes(rest)) + deflate.flush())
    checksum = zlib.adler32(bytes(rest), checksum)
    stream = b"\x78\xda" + b"".join(parts) + struct.pack(">I", checksum)
    path.write_bytes(_mat_header() + struct.pack("<II", 15, len(stream)) + stream)
    return path
