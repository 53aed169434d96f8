"""Recordings of what the APs streamed: one appendable HDF5 file per AP and rotation period.

:class:`RecordingStore` is the service's recorder. The ingest worker calls
:meth:`RecordingStore.append` with each batch's accepted segments (any APs mixed); the store
writes them to ``{folder}/{site}/{ap}/{site}_{ap}_{yyyymmddTHHMMSSZ}.h5`` (the UTC capture
time of the file's first segment; ``-1``, ``-2`` … on a clash). Site and AP names are
percent-encoded where they hold anything but letters, digits, ``.``, ``_``, ``-`` (and a
leading ``.``), so a topic level such as ``..`` can never leave the folder.

A file is a project recording (:mod:`csi_edge.recording`, format ``csi-pipeline-recording``
layout 1): ``csi_edge.recording.read_recording_file`` and ``read_labels`` read it, and so does
the ``recordings`` dataset used for training. On top of that layout each file keeps the
received segment codes, so the stream can be decoded again later with any copy of the bundle:

=======================  =================  ============================================
``segments/meta``        (K,) compound      one row per segment, fields: ``epoch`` int64
                                            (stream epoch), ``seq`` int64, ``timestamp_ms``
                                            int64 (capture time of the segment start, Unix
                                            ms), ``level`` uint8, ``quality`` float32
                                            (fraction backed by real frames), ``received``
                                            float64 (Unix s), ``model`` S64 (the full
                                            bundle id, 64 hex digits)
``segments/codes``       (K,) vlen uint8    the entropy-coded codes exactly as received
``segments/committed``   (1,) int64         segments known complete on disk
=======================  =================  ============================================

With ``reconstruction`` on, each segment's decoded CSI amplitude is stored as frames
(``timestamp``, ``amplitude`` (N, A, S)) on the segment grid: frame ``k`` of a segment is at
``timestamp_ms / 1000 + k / nominal_rate_hz``. The amplitude is the decoder's standardised
log-amplitude turned back (``expm1(x * scale + mean)`` per subcarrier, clipped at 0), so it is
only stored for bundles whose input spec is amplitude with ``log`` (or ``none``)
normalisation. Frames of a segment whose quality is below the bundle's ``min_quality`` are
left out (a gap on the time axis): the edge filled most of that segment, and a reader must
not mistake it for measured CSI. Device metadata (``device`` = the input spec's source kind,
``subcarriers``) comes from the bundle; ``extra`` names the site, AP and model.

A file holds one bundle's stream: a segment of another model, a capture time going back, a
file older than ``max_s`` (capture time of its first segment to the segment's end) or larger
than ``max_bytes`` (checked after each batch) starts a new file. A file that got nothing for
``max_s`` seconds of wall-clock time is closed.

Crash safety is the recording layout's (:func:`csi_edge.recording.write_header`,
:func:`~csi_edge.recording.commit`, shared with the edge's ``RecordingWriter``): every dataset
is created with the file, which is then switched to SWMR write mode and only extended; each
batch is written, flushed, and only then counted in ``committed`` / ``segments/committed``
(flushed again); a file without a commit record counts its dataset lengths. A killed process
loses at most the batch being written; readers take exactly the committed counts. By default
every :meth:`RecordingStore.append` commits the files it touched (what was acknowledged to
the broker is recorded); ``flush_s`` > 0 keeps segments in memory and commits each file at
most that often (much cheaper with many APs: one commit costs about 1-2 ms per file; a crash
then loses up to ``flush_s`` of recordings). A commit hands the data to the OS; ``fsync``
(against a power cut) runs at most every ``fsync_s`` seconds per file and at close. While a
file is open for writing, a hidden ``.{name}.lock`` next to it is held with ``flock``; a file
whose lock is free but whose HDF5 superblock still says "open for write" was left by a dead
writer and is recovered (its committed content copied into a clean file) before a label is
added to it.

Labels: :meth:`RecordingStore.label_range` adds the label to every file of the AP whose
time range overlaps it (in the file's ``labels`` dataset, as ``read_labels`` reads them);
a range reaching past the AP's newest data is also added to the files the AP opens later.

Modules by concern: :mod:`.writer` (one file being written), :mod:`.reader` (stored segments,
what a file holds), :mod:`.labels` (labels on closed files, recovering a dead writer's file),
:mod:`.store` (:class:`RecordingStore`: rotation, listing, label propagation).
"""

from .labels import LabelResult, recover
from .reader import (
    RecordingFile,
    StoredSegments,
    decode_stored,
    read_segments,
    unlabelled_ranges,
)
from .store import RecordingStore, safe_name
from .writer import SEGMENT_DTYPE, STORE_LAYOUT

__all__ = ["SEGMENT_DTYPE", "STORE_LAYOUT", "LabelResult", "RecordingFile", "RecordingStore",
           "StoredSegments", "decode_stored", "read_segments", "recover", "safe_name",
           "unlabelled_ranges"]
