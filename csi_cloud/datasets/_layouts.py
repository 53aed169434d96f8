"""The datasets the registry knows: where each one's labels come from, and its provenance.

Each ``_parse_*`` function gets a file's path as parts, starting with the data folder's own
name (so pointing ``data_dir`` straight at a labelled folder still yields its label), and
returns the labels or a one-line reason why the file is not an example. Parsing looks at
names only; the registry reads the file just to hash it.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from csi_edge._errors import CSIError

from ._model import DatasetSpec, ParsedLabels

__all__ = [
    "FITION_ACTIVITIES",
    "FITION_SAME_ROOM_USERS",
    "NTU_FI_HAR_CLASSES",
    "SPECS",
    "WIAR_ACTIVITIES",
]

# --- Fition -----------------------------------------------------------------------------------

FITION_ACTIVITIES = ("falling", "getintobed", "nm", "sitdown", "standup", "walking")
# Users recorded in the same physical room, in different sessions (rm1 = rm2, rm3 = rm4).
FITION_SAME_ROOM_USERS: tuple[tuple[str, str], ...] = (("user1", "user2"), ("user3", "user4"))
_FITION_FOLDER = re.compile(r"^(?P<activity>[a-z]+)_(?P<user>user\d+)_(?P<room>rm\d+)$")
_FITION_FILE = re.compile(r"^(?P<activity>[a-z]+)_(?P<user>user\d+)_(?P<room>rm\d+)_")


def _parse_fition(parts: tuple[str, ...]) -> ParsedLabels | str:
    name = parts[-1]
    if not name.lower().endswith(".pcap"):
        return "not a .pcap file"
    # The deepest <activity>_<user>_<room> folder above the file carries the label; folders
    # below it (old/, new/) are further sessions of the same label.
    found = [
        (i, m) for i, part in enumerate(parts[:-1]) if (m := _FITION_FOLDER.match(part))
    ]
    if not found:
        return "not inside an <activity>_<user>_<room> folder"
    at, match = found[-1]
    activity, user, room = match["activity"], match["user"], match["room"]
    if activity not in FITION_ACTIVITIES:
        return (
            f"folder {parts[at]!r} names activity {activity!r}; "
            f"Fition activities are {', '.join(FITION_ACTIVITIES)}"
        )
    own = _FITION_FILE.match(name)
    if own and (own["activity"], own["user"], own["room"]) != (activity, user, room):
        # A file named for another label inside this folder: which one is right is unknown.
        return f"file name says {own[0].rstrip('_')!r} but its folder says {parts[at]!r}"
    return ParsedLabels(
        activity=activity, identity=user, room=room, session="/".join(parts[at:-1])
    )


# --- WiAR -------------------------------------------------------------------------------------

WIAR_ACTIVITIES = (
    "horizontal arm wave", "high arm wave", "two hands wave", "high throw", "draw x",
    "draw tick", "toss paper", "forward kick", "side kick", "bend", "hand clap", "walk",
    "phone call", "drink water", "sit down", "squat",
)
_WIAR_FILE = re.compile(r"^csi_a(?P<activity>\d+)_(?P<n>\d+)\.dat$")


def _parse_wiar(parts: tuple[str, ...]) -> ParsedLabels | str:
    match = _WIAR_FILE.match(parts[-1])
    if not match:
        return "name does not match csi_a<activity>_<n>.dat"
    number = int(match["activity"])
    if not 1 <= number <= len(WIAR_ACTIVITIES):
        return f"activity number {number} is outside 1..{len(WIAR_ACTIVITIES)}"
    return ParsedLabels(
        activity=WIAR_ACTIVITIES[number - 1], identity=None, room=None, session=parts[-2]
    )


# --- NTU-Fi (SenseFi layout) ------------------------------------------------------------------

NTU_FI_HAR_CLASSES = ("box", "circle", "clean", "fall", "run", "walk")
_NTU_SPLITS = ("train_amp", "test_amp")


def _ntu_folders(parts: tuple[str, ...]) -> tuple[str, str] | str:
    """(split folder, class folder) of ``<split>/<class>/<file>.mat``, or why not."""
    if not parts[-1].lower().endswith(".mat"):
        return "not a .mat file"
    if len(parts) < 3 or parts[-3] not in _NTU_SPLITS:
        return "not in a train_amp/<class>/ or test_amp/<class>/ folder"
    return parts[-3], parts[-2]


def _parse_ntu_har(parts: tuple[str, ...]) -> ParsedLabels | str:
    folders = _ntu_folders(parts)
    if isinstance(folders, str):
        return folders
    split, label = folders
    if label not in NTU_FI_HAR_CLASSES:
        return f"class folder {label!r} is not one of {', '.join(NTU_FI_HAR_CLASSES)}"
    # The source's own train/test partition is kept as the session, so
    # split_by(key="session", test_values=["test_amp"]) reproduces the published split.
    return ParsedLabels(activity=label, identity=None, room=None, session=split)


def _parse_ntu_humanid(parts: tuple[str, ...]) -> ParsedLabels | str:
    folders = _ntu_folders(parts)
    if isinstance(folders, str):
        return folders
    split, person = folders
    if not person.isdigit():
        return f"folder {person!r} is not a person number (e.g. 001)"
    # Every recording is one person walking (gait); the task label is the person.
    return ParsedLabels(activity="walk", identity=person, room=None, session=split)


# --- Project recordings (HDF5) ----------------------------------------------------------------


def _parse_recording(parts: tuple[str, ...]) -> ParsedLabels | str:
    name = PurePosixPath(parts[-1])
    if name.suffix.lower() not in (".h5", ".hdf5"):
        return "not an .h5 or .hdf5 file"
    # One file is one capture: its path (without the suffix) names the session.
    session = "/".join((*parts[1:-1], name.stem))
    return ParsedLabels(activity="", identity=None, room=None, session=session)


def _expand_recording(path: Path, parsed: ParsedLabels) -> list[ParsedLabels] | str:
    """One example per labelled time range of the file's ``labels`` dataset."""
    # Imported here: the HDF5 module is needed by this dataset only.
    from csi_edge.recording import read_labels

    try:
        found = read_labels(path)
    except (CSIError, OSError) as exc:  # not a project recording, or unreadable
        return getattr(exc, "problem", None) or str(exc)
    # A range with no activity (identity only) has no task label here.
    labels = [label for label in found if getattr(label, "activity", None)]
    if not labels:
        return "no time range with an activity in its labels dataset"
    return [
        ParsedLabels(
            activity=str(label.activity),
            identity=str(label.identity) if getattr(label, "identity", None) else None,
            room=str(room) if (room := getattr(label, "room", None)) else None,
            session=parsed.session,
            start=float(label.start),
            end=float(label.end),
        )
        for label in labels
    ]


# --- The catalogue ----------------------------------------------------------------------------

_SENSEFI = "https://github.com/xyanchen/WiFi-CSI-Sensing-Benchmark"
_SENSEFI_DATA = "https://drive.google.com/drive/folders/1R0R8SlVbLI1iUFQCzh_mH90H_4CW2iwt"
_SENSEFI_CITATION = (
    "J. Yang, X. Chen, D. Wang, H. Zou, C. X. Lu, S. Sun, L. Xie, 'SenseFi: A Library and "
    "Benchmark on Deep-Learning-Empowered WiFi Human Sensing', Patterns 4(3), 2023"
)
_SENSEFI_LICENSE = (
    "not stated for the data; the SenseFi code repository that links it is MIT-licensed"
)

SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        name="fition",
        title="Fition",
        description=(
            "Nexmon CSI from a Raspberry Pi 3B+ (bcm43455c0), 5 GHz channel 36 with the "
            "receiver at 80 MHz, about 50 packets/s, about 10 s a file; six activities by "
            "four users in two physical rooms."
        ),
        source_url="https://github.com/hiranlowe/FitionDataset",
        license="not stated by the source repository",
        citation=(
            "Fition: public dataset of human activities, by hiranlowe, minullamahewage and "
            "kutilag, https://github.com/hiranlowe/FitionDataset"
        ),
        format="nexmon-pcap",
        label_key="activity",
        labels=FITION_ACTIVITIES,
        label_meaning=(
            "activity, user and room from the folder <activity>_<user>_<room> (nm = no "
            "movement); identity = user; rm1/rm2 are one physical room, so are rm3/rm4; nested "
            "old/ and new/ folders are separate sessions of the same label"
        ),
        layout="<activity>_<user>_<room>/[old|new/]*.pcap",
        how_to_get=(
            "git clone https://github.com/hiranlowe/FitionDataset and pass the clone (the "
            "folder holding the <activity>_<user>_<room> folders) as data_dir"
        ),
        parse=_parse_fition,
    ),
    DatasetSpec(
        name="wiar",
        title="WiAR",
        description=(
            "Intel 5300 CSI Tool logs (30 subcarrier groups x 3 receive antennas, about "
            "30 packets/s, about 10 s a file); sixteen activities and gestures."
        ),
        source_url="https://github.com/linteresa/WiAR",
        license="not stated by the source repository",
        citation=(
            "L. Guo, L. Wang, J. Liu, W. Zhou, B. Lu, 'A Novel Benchmark on Human Activity "
            "Recognition Using WiFi Signals', IEEE Healthcom 2017; and 'HuAc: Human Activity "
            "Recognition Using Crowdsourced WiFi Signals and Skeleton Data', Wireless "
            "Communications and Mobile Computing, 2018, doi:10.1155/2018/6163475"
        ),
        format="intel5300-dat",
        label_key="activity",
        labels=WIAR_ACTIVITIES,
        label_meaning=(
            "activity k of csi_a<k>_<n>.dat, 1..16 by name (1 horizontal arm wave ... "
            "16 squat); n is the sample number; no identity labels; session = parent folder"
        ),
        layout="<folder>/csi_a<activity>_<n>.dat",
        how_to_get=(
            "git clone https://github.com/linteresa/WiAR and pass one folder of csi_a*.dat "
            "files (e.g. height_factor_activity_data/90_rawdata) as data_dir"
        ),
        parse=_parse_wiar,
    ),
    DatasetSpec(
        name="ntu-fi-har",
        title="NTU-Fi HAR",
        description=(
            "CSI amplitude as MATLAB files (CSIamp, 342 x 2000: 3 antennas x 114 subcarriers "
            "x 2000 packets), in the SenseFi benchmark layout; six activities."
        ),
        source_url=_SENSEFI,
        license=_SENSEFI_LICENSE,
        citation=(
            "J. Yang, X. Chen, H. Zou, D. Wang, Q. Xu, L. Xie, 'EfficientFi: Towards "
            "Large-Scale Lightweight WiFi Sensing via CSI Compression', IEEE Internet of "
            "Things Journal, 2022, doi:10.1109/JIOT.2021.3139958; and " + _SENSEFI_CITATION
        ),
        format="ntu-fi-mat",
        label_key="activity",
        labels=NTU_FI_HAR_CLASSES,
        label_meaning=(
            "activity = class folder (box, circle, clean, fall, run, walk); session = "
            "train_amp or test_amp, the published split"
        ),
        layout="[NTU-Fi_HAR/]{train_amp,test_amp}/<class>/*.mat",
        how_to_get=(
            f"download NTU-Fi_HAR from the SenseFi data folder ({_SENSEFI_DATA}), unzip, and "
            "pass the folder holding train_amp/ and test_amp/ as data_dir"
        ),
        parse=_parse_ntu_har,
    ),
    DatasetSpec(
        name="ntu-fi-humanid",
        title="NTU-Fi HumanID",
        description=(
            "CSI amplitude (CSIamp, 342 x 2000) of 14 people walking, for gait-based person "
            "identification, in the SenseFi benchmark layout."
        ),
        source_url=_SENSEFI,
        license=_SENSEFI_LICENSE,
        citation=(
            "D. Wang, J. Yang, W. Cui, L. Xie, S. Sun, 'CAUTION: A Robust WiFi-based Human "
            "Authentication System via Few-shot Open-set Gait Recognition', IEEE Internet of "
            "Things Journal, 2022, doi:10.1109/JIOT.2022.3156099; and " + _SENSEFI_CITATION
        ),
        format="ntu-fi-mat",
        label_key="identity",
        labels=None,
        label_meaning=(
            "identity = person folder (a number such as 001); the task label is the identity; "
            "activity is always 'walk'; session = train_amp or test_amp"
        ),
        layout="[NTU-Fi-HumanID/]{train_amp,test_amp}/<person number>/*.mat",
        how_to_get=(
            f"download NTU-Fi-HumanID from the SenseFi data folder ({_SENSEFI_DATA}), unzip, "
            "and pass the folder holding train_amp/ and test_amp/ as data_dir"
        ),
        parse=_parse_ntu_humanid,
    ),
    DatasetSpec(
        name="recordings",
        title="project HDF5",
        description=(
            "HDF5 recordings written by this project (csi_edge.recording), labelled with "
            "time ranges in each file's labels dataset."
        ),
        source_url="",
        license="yours: recordings you made with this project",
        citation="",
        format="hdf5",
        label_key="activity",
        labels=None,
        label_meaning=(
            "one example per labelled time range (start, end, activity, identity); every "
            "example of a file shares its recording_id, so splits keep a file on one side; "
            "session = the file's path without suffix"
        ),
        layout="**/*.h5 with a labels dataset",
        how_to_get="record with this project's recorder; pass the folder of .h5 files",
        parse=_parse_recording,
        expand=_expand_recording,
    ),
)
