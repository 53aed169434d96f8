"""The model contract: ``compress(segments) -> bytes`` and ``decompress(bytes) -> codes,
reconstruction``, plus classification over a context of decoded segments.

The bytes are a complete wire payload (csi_edge.codec). The decoder sees nothing but them:
the latent symbols and profile coefficients are entropy-decoded from the payload, and the
reconstruction is ``decoder(latent) + decoded profile``, in the standardised log-amplitude
domain of the encoder (``(log1p|H| - mean) / scale``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from csi_edge.bundle import (
    Bundle,
    BundleManifest,
    SegmentCodes,
    encode_message_codes,
    payload_codes,
)
from csi_edge.codec import (
    Payload,
    PayloadError,
    SegmentRecord,
    decode_payload,
    encode_payload,
    model_id_prefix,
)

from .bundle import load_network
from .context_head import profile_coefficients
from .lengths import ContextLengths
from .network import CSICodecNet
from .openset import needs_features, open_set_decision
from .quantizers import FSQ
from .temperature import activity_temperature, apply_temperature
from .window import Windows

__all__ = ["CloudModel", "DecodedSegment", "Prediction", "classify_windows"]


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch's operators on one thread on the calling thread while in effect.

    The context classifier's operators are small (a few hundred slot vectors of 64 values
    for a run of 64 windows): split over torch's threads, the threads spend more processor
    time waiting for each other (spinning) than computing, the more so the busier the
    machine (the Fition bundle's full-window classification, which runs the network for its
    open-set score, on 64 windows: 142 ms of CPU before, 12 ms with this and the faster head;
    bench/results/live_cpu.json). The numbers are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def classify_windows(net: CSICodecNet, windows: Windows, *, features: bool = True,
                     identity: bool = True, reading: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Windows -> activity probabilities (W, A), identity probabilities (W, I) (or None),
    identity features (W, 2E) (or None).

    With a context head, the network's context classifier runs only for what the head does
    not give: identity (when the head has no identity part, unless ``identity`` is False:
    activity alone is asked) and, with ``features``, the identity features of the open-set
    score. ``reading``: the windows are the live output's readings of their last
    ``reading`` slots (the head's short-reading layer reads their activity, where it has
    one)."""
    head = net.context_head
    p_act = p_id = feats = None
    if head is not None:
        coeff = profile_coefficients(net, windows.profile,
                                     transmitted=windows.level < net.cfg.levels)
        p_act, p_id = head.predict(windows.z_q, coeff, windows.present, windows.level,
                                   reading=reading)
    need_identity = identity and p_id is None and net.classifier.identity is not None
    if head is None or need_identity or (features and net.classifier.identity is not None):
        classifier = net.classifier
        with _one_torch_thread():
            pooled, f = classifier.features(
                torch.from_numpy(windows.z_q), torch.from_numpy(windows.profile),
                torch.from_numpy(windows.present), torch.from_numpy(windows.level))
        if p_act is None:
            p_act = torch.softmax(classifier.activity(pooled), dim=-1).numpy()
        if need_identity:
            assert classifier.identity is not None
            p_id = torch.softmax(classifier.identity(f), dim=-1).numpy()
        feats = f.numpy()
    assert p_act is not None
    return p_act, p_id, feats


# Windows per classifier run. torch's CPU kernels (oneDNN) compile and keep a primitive per
# layer and input shape, up to 1024: every distinct batch size ingest met stayed in memory
# (measured: 120 sizes, +70 MB). Runs of this many, the last padded to a power of two, give
# the classifier 7 shapes in all.
_CLASSIFY_CHUNK = 64


def _in_fixed_shapes(windows: Windows) -> list[Windows]:
    """``windows`` in runs of ``_CLASSIFY_CHUNK``, the last one padded (repeating its last
    window) to a power of two; each window is classified on its own, so padding changes no
    result."""
    out = []
    for start in range(0, len(windows.present), _CLASSIFY_CHUNK):
        part = [x[start:start + _CLASSIFY_CHUNK] for x in
                (windows.z_q, windows.profile, windows.present, windows.level)]
        pad = (1 << (len(part[0]) - 1).bit_length()) - len(part[0])
        if pad:
            part = [np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) for x in part]
        out.append(Windows(*part))
    return out


@dataclass(frozen=True, slots=True)
class Prediction:
    """What a bundle says about W windows."""

    activity: np.ndarray  # (W, A) probabilities (temperature-scaled unless uncalibrated)
    identity: np.ndarray | None  # (W, I) probabilities; None: the bundle has no identities
    unknown: np.ndarray  # (W,) bool: past the bundle's open-set threshold (nobody enrolled)
    # (W, A) the activity probabilities before their temperature (classify_live: of the
    # reading given); None where classify already returns them uncalibrated
    activity_raw: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class DecodedSegment:
    seq: int
    timestamp_ms: int
    quality: float
    codes: SegmentCodes
    z_q: np.ndarray  # (D, T) what the classifier sees (zeros beyond the level's channels)
    profile: np.ndarray  # (P * C,) decoded standardised profile (P profile blocks)
    reconstruction: np.ndarray  # (L, A, S) standardised log amplitude


class CloudModel:
    """A loaded bundle: float compress (reference path), decompress and classify."""

    def __init__(self, manifest: BundleManifest, net: CSICodecNet) -> None:
        self.manifest = manifest
        self.net = net.eval()
        self.tables = manifest.tables()
        self.model_id = model_id_prefix(manifest.wire_id)
        self.segment_ms = round(manifest.input_spec.segment_s * 1000)
        # Applied to the activity probabilities (csi_cloud.model.temperature); 1 without one.
        self.temperature = activity_temperature(manifest.calibration)
        # The lengths the live output reads each window at (csi_cloud.model.lengths).
        self.lengths = ContextLengths.from_calibration(
            manifest.calibration, net.cfg.context_segments, self.temperature)
        self._still_symbols: np.ndarray | None = None

    @classmethod
    def load(cls, folder: str | Path | Bundle, verify: bool = True) -> CloudModel:
        """A bundle folder (its manifest read and checked) or a loaded :class:`Bundle`."""
        manifest, net = load_network(folder, verify=verify)
        return cls(manifest, net)

    @property
    def id(self) -> str:
        return self.manifest.id

    @torch.no_grad()
    def encode(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float reference encoder: (B, L, A, S) -> symbols (B, G, T), profile codes
        (B, P * Kmax)."""
        z, profile = self.net.encoder(torch.from_numpy(segments.astype(np.float32)))
        symbols = self.net.quantize(z).symbols.numpy()
        return symbols, self.net.profile_codes(profile, self.net.cfg.levels - 1).numpy()

    def compress(self, segments: np.ndarray, *, level: int, first_seq: int = 0, epoch: int = 0,
                 timestamp_ms: int = 0, quality: list[float] | None = None) -> bytes:
        symbols, profile = self.encode(segments)
        spec = self.manifest.level(level)
        codes = [SegmentCodes(level, s[: spec.groups], self.manifest.level_profile(p, level))
                 for s, p in zip(symbols, profile, strict=True)]
        quality = quality or [1.0] * len(codes)
        return encode_payload(Payload(level, self.model_id, epoch, first_seq, timestamp_ms,
                                      tuple(SegmentRecord(q) for q in quality),
                                      codes=encode_message_codes(codes, self.manifest,
                                                                 self.tables)))

    def decompress(self, data: bytes, last: SegmentCodes | None = None) -> list[DecodedSegment]:
        """A wire payload -> its segments' codes and reconstructions.

        ``last``: the stream's last coded segment, which an idle message repeats
        (:meth:`idle_codes`).
        """
        payload, codes = self.decode_codes(data, last)
        z_q, profile, recon = self.reconstruct(codes)
        return [
            DecodedSegment(payload.seq(i), payload.start_ms(i, self.segment_ms), s.quality,
                           codes[i], z_q[i], profile[i], recon[i])
            for i, s in enumerate(payload.segments)
        ]

    def decode_codes(self, data: bytes, last: SegmentCodes | None = None
                     ) -> tuple[Payload, list[SegmentCodes]]:
        """A wire payload -> the payload and its segments' codes, from the bytes alone (the
        first half of :meth:`decompress`; reconstruct them, batched, with
        :meth:`reconstruct`)."""
        payload = decode_payload(data)
        if payload.model_id != self.model_id:
            raise PayloadError("unknown_model", f"model id {payload.model_id.hex()} is not "
                               f"{self.model_id.hex()} ({self.manifest.name})")
        if payload.idle:
            return payload, [self.idle_codes(payload.level, last)] * len(payload.segments)
        return payload, payload_codes(payload, self.manifest, self.tables)

    @torch.no_grad()
    def still_symbols(self) -> np.ndarray:
        """Latent symbols (G, T) of a segment with no dynamics at all (constant in time).

        The encoder subtracts each segment's time mean, so any constant segment encodes to
        these; computed once with the float encoder. It stands in for an idle segment when the
        cloud holds no earlier segment of the stream to repeat.
        """
        if self._still_symbols is None:
            cfg = self.net.cfg
            x = torch.zeros(1, cfg.segment_frames, cfg.antennas, cfg.subcarriers)
            z, _ = self.net.encoder(x)
            self._still_symbols = self.net.quantize(z).symbols[0].numpy().astype(np.int64)
        return self._still_symbols

    def idle_codes(self, level: int, last: SegmentCodes | None) -> SegmentCodes:
        """The codes an idle segment (csi_edge.codec flag IDLE) stands for, at ``level``.

        Idle means "nothing moved since the stream's last coded segment", so it is that
        segment's codes (``last``, cut or padded to the level: missing latent groups take
        :meth:`still_symbols`, missing profile coefficients 0). Without one (a fresh cloud, or
        the stream's first message idle) it is a still latent with the bundle's mean profile.
        Measured on Fition validation recordings, repeating the last segment costs less
        activity accuracy than the still latent or the most common still symbols.
        """
        spec = self.manifest.level(level)
        latent = self.still_symbols()[: spec.groups].copy()
        blocks = self.manifest.profile_blocks
        profile = np.zeros((blocks, spec.profile_components), dtype=np.int64)
        if last is not None:
            g = min(spec.groups, last.latent.shape[0])
            latent[:g] = last.latent[:g]
            sent = last.profile.reshape(blocks, -1)
            k = min(spec.profile_components, sent.shape[1])
            profile[:, :k] = sent[:, :k]
        return SegmentCodes(level, latent, profile.reshape(-1))

    def warm(self) -> None:
        """Classify still segments once at every rate level and in every run shape
        (:func:`_in_fixed_shapes`), and forget them: what the first predictions would load
        (torch's kernels, the numba JIT of a ROCKET head: about 130 MB) is loaded now, so no
        live segment waits for it and the memory is the process's from the start."""
        levels = [lv.level for lv in self.manifest.levels]
        z_q, profile = self.decode_latent([self.idle_codes(level, None) for level in levels])
        n = self.net.cfg.context_segments
        size = 1
        while size <= _CLASSIFY_CHUNK:
            rows = np.full((size, n), -1, dtype=np.int64)
            rows[:, -1] = np.arange(size) % len(levels)
            self.classify(Windows.gather(rows, z_q, profile, np.array(levels)[rows[:, -1]]))
            size *= 2

    @torch.no_grad()
    def decode_latent(self, codes: list[SegmentCodes]) -> tuple[np.ndarray, np.ndarray]:
        """Codes -> what the classifier reads: z_q (B, D, T) and the profile (B, P * C)."""
        z_q, profile = self._latent(codes)
        return z_q.numpy(), profile.numpy()

    def _latent(self, codes: list[SegmentCodes]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.net.cfg
        t = int(self.manifest.quantizer["latent_steps"])
        quantizer = self.net.code_quantizer
        groups = quantizer.groups
        fill = quantizer.half_width if isinstance(quantizer, FSQ) else 0
        symbols = torch.full((len(codes), groups, t), fill, dtype=torch.long)
        mask = torch.zeros(len(codes), cfg.latent_channels, 1)
        profiles = []
        for i, c in enumerate(codes):
            g = c.latent.shape[0]
            symbols[i, :g] = torch.from_numpy(c.latent)
            mask[i, : g * self.net.group_size] = 1.0
            profiles.append(self.net.profile_decode(torch.from_numpy(c.profile)[None])[0])
        return quantizer.dequantize(symbols) * mask, torch.stack(profiles)

    @torch.no_grad()
    def reconstruct(self, codes: list[SegmentCodes]) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
        """Codes -> z_q (B, D, T), profile (B, P * C), reconstruction (B, L, A, S)."""
        cfg = self.net.cfg
        z_q, profile = self._latent(codes)
        dynamics = self.net.decoder(z_q)
        recon = (dynamics + self.net.profile_frames(profile)).transpose(1, 2)
        shape = (len(codes), cfg.segment_frames, cfg.antennas, cfg.subcarriers)
        return z_q.numpy(), profile.numpy(), recon.reshape(shape).numpy()

    @torch.no_grad()
    def classify(self, windows: Windows, *, calibrated: bool = True) -> Prediction:
        """Windows -> activity and identity probabilities, and the open-set decision.

        A bundle with a context head (csi_cloud.model.context_head) takes activity, and
        identity where the head has an identity part, from it; the network's context
        classifier gives the rest, and the identity features when the open-set score reads
        them (csi_cloud.model.openset). The activity probabilities are temperature-scaled
        (:attr:`temperature`) unless ``calibrated`` is False."""
        calibration = self.manifest.calibration
        n = len(windows.present)
        parts = [classify_windows(self.net, part, features=needs_features(calibration))
                 for part in _in_fixed_shapes(windows)]
        p_act, p_id, feats = (None if parts[0][k] is None else
                              np.concatenate([p[k] for p in parts])[:n] for k in range(3))
        assert p_act is not None
        unknown = (open_set_decision(p_id, calibration, feats) if p_id is not None
                   else np.zeros(len(p_act), dtype=bool))
        return Prediction(apply_temperature(p_act, self.temperature) if calibrated else p_act,
                          p_id, unknown, p_act if calibrated else None)

    def readings(self, windows: Windows,
                 lengths: Sequence[int] | None = None) -> list[np.ndarray]:
        """Uncalibrated activity probabilities (W, A) of the windows read at each of
        ``lengths`` (default: the live output's :attr:`lengths` but the full one); activity
        only: the identity and the open-set decision read the full window, :meth:`classify`.

        With a context head, all lengths in one pass of the head per run of windows
        (ContextHead.predict_lengths); it gives what :meth:`readings_one_by_one` gives, to
        float32 rounding, for a fraction of the processor time."""
        lengths = list(self.lengths.lengths[:-1] if lengths is None else lengths)
        head = self.net.context_head
        if head is None or not lengths:
            return self.readings_one_by_one(windows, lengths)
        runs = []
        for start in range(0, len(windows), _CLASSIFY_CHUNK):
            # No padding to a fixed shape: the head runs no torch kernel (_in_fixed_shapes).
            z_q, profile, present, level = (x[start:start + _CLASSIFY_CHUNK] for x in
                                            (windows.z_q, windows.profile, windows.present,
                                             windows.level))
            coeff = profile_coefficients(self.net, profile,
                                         transmitted=level < self.net.cfg.levels)
            runs.append(head.predict_lengths(z_q, coeff, present, level, lengths))
        if not runs:
            return [np.zeros((0, self.net.cfg.activities), np.float32) for _ in lengths]
        return [np.concatenate([run[i] for run in runs]) for i in range(len(lengths))]

    def readings_one_by_one(self, windows: Windows,
                            lengths: Sequence[int] | None = None) -> list[np.ndarray]:
        """:meth:`readings` by definition: each length's windows (Windows.last) classified
        on their own, as :meth:`classify` classifies the full ones (the path of a bundle
        without a context head; tests compare :meth:`readings` to it)."""
        n = len(windows.present)
        full = self.net.cfg.context_segments
        return [np.concatenate([classify_windows(self.net, part, features=False,
                                                 identity=False,
                                                 reading=k if k < full else None)[0]
                                for part in _in_fixed_shapes(windows.last(k))])[:n]
                for k in (self.lengths.lengths[:-1] if lengths is None else lengths)]

    def classify_live(self, windows: Windows) -> Prediction:
        """:meth:`classify`, with the activity the live output gives: the windows read at each
        of :attr:`lengths`, each calibrated, then the most confident per window or their
        pool (csi_cloud.model.lengths); the same as :meth:`classify` for a bundle that reads the
        full length only."""
        full = self.classify(windows, calibrated=False)
        activity, raw = self.live_activity(windows, full.activity)
        return Prediction(activity, full.identity, full.unknown, raw)

    def live_activity(self, windows: Windows, full: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        """The live output's activity probabilities (W, A), calibrated and not, from the
        full windows' uncalibrated ones ``full`` (W, A) (:meth:`classify_live` without the
        full-window pass, for a caller that has it already)."""
        return self.lengths.read([*self.readings(windows), full])

    def standardise(self, segments: np.ndarray) -> np.ndarray:
        """Preprocessed segments (B, L, A, S) -> the standardised domain of reconstructions."""
        enc = self.net.encoder
        b, length = segments.shape[:2]
        xs = (torch.from_numpy(segments.astype(np.float32)).reshape(b, length, -1) - enc.mean)
        return (xs / enc.scale).reshape(segments.shape).numpy()
