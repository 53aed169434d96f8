"""Intel 5300 (Linux 802.11n CSI Tool) ``.dat`` logs, decoded by csiread.

csiread decodes the bfee records, but it crashes the interpreter (SIGSEGV) on a truncated
file or a record with a corrupt length. So the record framing is validated here first; a
file with broken records is handed to csiread as a cleaned copy holding only the good ones.

File layout: a sequence of records ``[u16 big-endian length L][u8 code][L-1 bytes]``.
Code 0xbb is a beamforming feedback (bfee) record; its body starts with a 20-byte header:
  0 u32 timestamp_low (µs, wraps every ~72 min)   4 u16 bfee_count   6 u16 reserved
  8 u8 Nrx   9 u8 Ntx   10-12 u8 rssi_a/b/c   13 i8 noise   14 u8 agc   15 u8 antenna_sel
  16 u16 len (CSI bytes)   18 u16 fake_rate_n_flags   20 CSI bits
A bfee record is valid when ``len == (30 * (Nrx * Ntx * 16 + 3) + 7) // 8`` and the record
holds it. Other codes (e.g. 0xc1) carry no CSI and are skipped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .._errors import EmptyRecordingError, FormatError
from ..frames import CSIFrames, DropCounter, RadioInfo
from ._files import read_file_bytes

__all__ = ["SUBCARRIERS_20MHZ", "SUBCARRIERS_40MHZ", "read_intel5300_dat", "scan_records"]

BFEE_CODE = 0xBB
# Subcarrier numbers of the 30 reported groups (802.11n grouping Ng=2 at 20 MHz, Ng=4 at 40).
SUBCARRIERS_20MHZ = (*range(-28, -1, 2), -1, *range(1, 28, 2), 28)
SUBCARRIERS_40MHZ = tuple(range(-58, 59, 4))
_HT40_FLAG = 0x800


def _bfee_len(nrx: int, ntx: int) -> int:
    return (30 * (nrx * ntx * 16 + 3) + 7) // 8


def _valid_bfee(buf: bytes, off: int, n: int) -> bool:
    """Is there a complete, self-consistent bfee record at ``off``?"""
    if off + 3 + 20 > n:
        return False
    length = int.from_bytes(buf[off : off + 2], "big")
    if buf[off + 2] != BFEE_CODE:
        return False
    body = off + 3
    nrx, ntx = buf[body + 8], buf[body + 9]
    if not (1 <= nrx <= 3 and 1 <= ntx <= 3):
        return False
    csi_len = int.from_bytes(buf[body + 16 : body + 18], "little")
    # Exact size: a longer length field is corruption (csiread would read past the record).
    return csi_len == _bfee_len(nrx, ntx) and length == 1 + 20 + csi_len and off + 2 + length <= n


def _consistent_length(buf: bytes, off: int, length: int) -> bool:
    """Does the record length agree with its own bfee header (when the header is there)?"""
    body = off + 3
    if body + 20 > len(buf):
        return True  # too little left to tell: the file simply ends here
    nrx, ntx = buf[body + 8], buf[body + 9]
    return 1 <= nrx <= 3 and 1 <= ntx <= 3 and length == 1 + 20 + _bfee_len(nrx, ntx)


def scan_records(buf: bytes) -> tuple[list[tuple[int, int]], DropCounter]:
    """(offset, size) of every valid bfee record, and what was skipped by reason."""
    dropped = DropCounter()
    good: list[tuple[int, int]] = []
    off, n = 0, len(buf)
    while off < n:
        if n - off < 3:
            dropped["truncated_record"] += 1
            break
        length = int.from_bytes(buf[off : off + 2], "big")
        code = buf[off + 2]
        if _valid_bfee(buf, off, n):
            good.append((off, 2 + length))
            off += 2 + length
            continue
        if code == BFEE_CODE and off + 2 + length > n and _consistent_length(buf, off, length):
            dropped["truncated_record"] += 1  # the log stops mid-record
            break
        if code != BFEE_CODE and length >= 1 and off + 2 + length <= n and good:
            # A well-framed record of another kind (other CSI Tool message types).
            dropped["non_csi_record"] += 1
            off += 2 + length
            continue
        dropped["corrupt_record"] += 1
        # Resynchronise on the next bfee record that checks out.
        nxt = buf.find(bytes([BFEE_CODE]), off + 3)
        while nxt != -1 and not _valid_bfee(buf, nxt - 2, n):
            nxt = buf.find(bytes([BFEE_CODE]), nxt + 1)
        if nxt == -1:
            break
        off = nxt - 2
    return good, dropped


def _total_rssi_dbm(rssi: np.ndarray, agc: np.ndarray) -> np.ndarray:
    """Combined RSSI in dBm from the per-antenna values (the CSI Tool's get_total_rss)."""
    mw = np.where(rssi > 0, 10.0 ** (rssi / 10.0), 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        rssi_dbm: np.ndarray = (10 * np.log10(mw) - 44 - agc).astype(np.float32)
        return rssi_dbm


def read_intel5300_dat(path: str | Path) -> CSIFrames:
    """CSI of one Intel 5300 log: (frames, receive antennas, 30 subcarrier groups).

    Only the first transmit stream is kept. Frames with fewer receive antennas than the
    majority are dropped as ``antenna_mismatch``. Timestamps are the NIC's µs clock, unwrapped
    and relative (the log has no wall-clock time).
    """
    import csiread

    path = Path(path)
    buf = read_file_bytes(path, "an Intel 5300 CSI log")
    records, dropped = scan_records(buf)
    if not records:
        raise EmptyRecordingError(
            path, f"no valid Intel 5300 bfee record in {len(buf)} bytes ({dropped.as_dict()})"
        )
    nrx = max(buf[o + 3 + 8] for o, _ in records)
    ntx = max(buf[o + 3 + 9] for o, _ in records)
    clean = sum(size for _, size in records) == len(buf)
    tmp_name: str | None = None
    try:
        if clean:
            target = str(path)
        else:
            fd, tmp_name = tempfile.mkstemp(suffix=".dat")
            with os.fdopen(fd, "wb") as fh:
                fh.write(b"".join(buf[o : o + s] for o, s in records))
            target = tmp_name
        data = csiread.Intel(target, nrxnum=nrx, ntxnum=ntx, if_report=False)
        data.read()
    finally:
        if tmp_name:
            os.unlink(tmp_name)
    if data.count != len(records):
        raise FormatError(path, f"csiread decoded {data.count} of {len(records)} valid records")

    keep = data.Nrx == nrx
    dropped["antenna_mismatch"] += int((~keep).sum())
    ts_low = data.timestamp_low.astype(np.int64)
    unwrapped = ts_low + np.concatenate([[0], np.cumsum(np.diff(ts_low) < 0)]) * (1 << 32)
    timestamp = (unwrapped - unwrapped[0]) / 1e6
    csi = data.csi[keep, :, :, 0].transpose(0, 2, 1).astype(np.complex64)  # (N, Nrx, 30)
    rate = int(np.bincount(data.rate[keep] & _HT40_FLAG).argmax()) if keep.any() else 0
    ht40 = bool(rate & _HT40_FLAG)
    rssi = np.stack([data.rssi_a, data.rssi_b, data.rssi_c][:nrx], axis=1)[keep]
    info = RadioInfo(
        device="intel5300",
        subcarriers=SUBCARRIERS_40MHZ if ht40 else SUBCARRIERS_20MHZ,
        chip="iwl5300",
        bandwidth_mhz=40 if ht40 else 20,
        rssi_is_real=True,
        extra={"transmit_streams": ntx, "transmit_stream_kept": 0, "timestamps": "nic-clock"},
    )
    return CSIFrames(
        timestamp=timestamp[keep],
        csi=csi,
        info=info,
        format="intel5300-dat",
        source=str(path),
        rssi=_total_rssi_dbm(rssi.astype(np.float64), data.agc[keep].astype(np.float64)),
        dropped=dropped,
    )
