"""Dataset registry: indexing real layouts, labels, dedupe, leak-free splits, summaries, errors."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io

from csi_cloud.datasets import (
    DATASETS,
    FITION_ACTIVITIES,
    NTU_FI_HAR_CLASSES,
    WIAR_ACTIVITIES,
    Example,
    Split,
    UnknownDatasetError,
    cross_session_splits,
    get_dataset,
    index_dataset,
    kfold,
    list_datasets,
    random_split,
    split_by,
    summarize,
)
from csi_edge import NoRecordingsError

FITION_SAMPLE_LABELS = {
    # file name: (activity, identity, room, session)
    "falling_user1_rm1_1.pcap": ("falling", "user1", "rm1", "falling_user1_rm1"),
    "getintobed_user4_rm4_24.pcap": ("getintobed", "user4", "rm4", "getintobed_user4_rm4"),
    "nm_user2_rm2_10.pcap": ("nm", "user2", "rm2", "nm_user2_rm2"),
    "nm_user4_rm4_11.pcap": ("nm", "user4", "rm4", "nm_user4_rm4"),
    "sitdown_user3_rm3_20.pcap": ("sitdown", "user3", "rm3", "sitdown_user3_rm3"),
    "standup_user3_rm3_1.pcap": ("standup", "user3", "rm3", "standup_user3_rm3/new"),
    "walking_user1_rm1_10.pcap": ("walking", "user1", "rm1", "walking_user1_rm1"),
    "walking_user2_rm2_11.pcap": ("walking", "user2", "rm2", "walking_user2_rm2"),
}
SUMMARY_KEYS = {"dataset", "total", "classes", "splits"}


@pytest.fixture(scope="module")
def fition_samples(samples: Path) -> Path:
    return samples / "fition"


@pytest.fixture(scope="module")
def wiar_samples(samples: Path) -> Path:
    return samples / "wiar" / "height_90"


def _sample(fition_samples: Path, name: str) -> Path:
    return next(fition_samples.rglob(name))


def _ids(examples: tuple[Example, ...]) -> set[str]:
    return {e.recording_id for e in examples}


def _synthetic(counts: dict[str, int], segments: int = 1) -> list[Example]:
    """Plain examples (no files) for split arithmetic: ``segments`` per recording."""
    out = []
    for activity, n in counts.items():
        for i in range(n):
            for s in range(segments):
                out.append(Example(
                    path=Path(f"/data/{activity}/{i}.h5"), activity=activity,
                    identity=f"user{i % 3}", room=None, session=f"{activity}/{i}",
                    recording_id=f"{activity}-{i:04d}", format="hdf5", start=float(s),
                    end=float(s + 1),
                ))
    return out


def _assert_disjoint(split: Split, everything: list[Example]) -> None:
    train, val, test = _ids(split.train), _ids(split.val), _ids(split.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == {e.recording_id for e in everything}
    assert len(split.train) + len(split.val) + len(split.test) == len(everything)


def _ntu_tree(root: Path, classes: dict[str, tuple[int, int]], prefix: str = "") -> None:
    """SenseFi layout: {train_amp,test_amp}/<class>/<prefix><i>.mat, each with its own CSIamp."""
    rng = np.random.default_rng(7)
    for label, (n_train, n_test) in classes.items():
        for split, n in (("train_amp", n_train), ("test_amp", n_test)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                amp = rng.uniform(30, 50, size=(342, 20)).astype(np.float32)
                scipy.io.savemat(folder / f"{prefix or label}{i}.mat", {"CSIamp": amp})


# --- registry ---------------------------------------------------------------------------------


def test_registry_lists_every_dataset_with_provenance() -> None:
    assert list_datasets() == ["fition", "ntu-fi-har", "ntu-fi-humanid", "recordings", "wiar"]
    for name in ("fition", "wiar", "ntu-fi-har", "ntu-fi-humanid"):
        spec = DATASETS[name]
        assert spec.source_url.startswith("https://")
        assert spec.license and spec.citation and spec.how_to_get and spec.label_meaning
    assert get_dataset("ntu-fi-humanid").label_key == "identity"


def test_dataset_names_accept_source_spellings() -> None:
    assert get_dataset("NTU-Fi_HAR").name == "ntu-fi-har"
    assert get_dataset("NTU-Fi-HumanID").name == "ntu-fi-humanid"
    assert get_dataset(" Fition ").name == "fition"


def test_unknown_dataset_name_lists_known_names(fition_samples: Path) -> None:
    with pytest.raises(UnknownDatasetError, match=r"'widar'.*fition, ntu-fi-har") as err:
        get_dataset("widar")
    assert err.value.known == list_datasets()
    with pytest.raises(UnknownDatasetError, match="known datasets"):
        index_dataset("widar", fition_samples)
    with pytest.raises(LookupError):
        summarize("widar", fition_samples)


# --- Fition -----------------------------------------------------------------------------------


def test_fition_samples_index_with_labels_from_folders(fition_samples: Path) -> None:
    index = index_dataset("fition", fition_samples)
    assert len(index) == 8 and index.recordings == 8
    assert index.duplicates == () and index.ignored == ()
    for e in index:
        assert (e.activity, e.identity, e.room, e.session) == FITION_SAMPLE_LABELS[e.path.name]
        assert e.format == "nexmon-pcap" and e.dataset == "fition"
        assert len(e.recording_id) == 16 and int(e.recording_id, 16) >= 0
        assert e.start is None and e.end is None
    assert len(_ids(index.examples)) == 8
    assert index.counts() == {"falling": 1, "getintobed": 1, "nm": 2, "sitdown": 1,
                              "standup": 1, "walking": 2}
    assert index.counts("identity") == {"user1": 2, "user2": 2, "user3": 2, "user4": 2}


def test_recording_id_is_stable_and_content_based(fition_samples: Path, tmp_path: Path) -> None:
    first = index_dataset("fition", fition_samples)
    again = index_dataset("fition", fition_samples)
    assert [e.recording_id for e in first] == [e.recording_id for e in again]
    src = _sample(fition_samples, "nm_user2_rm2_10.pcap")
    renamed = tmp_path / "nm_user2_rm2" / "capture.pcap"
    renamed.parent.mkdir()
    shutil.copy(src, renamed)
    copy = index_dataset("fition", tmp_path).examples[0]
    original = next(e for e in first if e.path.name == src.name)
    assert copy.recording_id == original.recording_id
    assert copy.activity == "nm" and copy.identity == "user2"


def test_example_is_frozen(fition_samples: Path) -> None:
    e = index_dataset("fition", fition_samples).examples[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.activity = "walking"  # type: ignore[misc]


def test_fition_nested_old_new_are_sessions_of_one_label(
    fition_samples: Path, tmp_path: Path
) -> None:
    for sub, name in (("old", "sitdown_user3_rm3_20.pcap"), ("new", "standup_user3_rm3_1.pcap")):
        folder = tmp_path / "extra" / "standup_user3_rm3" / sub
        folder.mkdir(parents=True)
        shutil.copy(_sample(fition_samples, name), folder / f"standup_user3_rm3_{sub}.pcap")
    index = index_dataset("fition", tmp_path)
    assert sorted(e.session for e in index) == ["standup_user3_rm3/new", "standup_user3_rm3/old"]
    assert {(e.activity, e.identity, e.room) for e in index} == {("standup", "user3", "rm3")}


def test_fition_data_dir_may_be_one_labelled_folder(fition_samples: Path) -> None:
    index = index_dataset("fition", fition_samples / "standup_user3_rm3")
    assert [(e.activity, e.session) for e in index] == [("standup", "standup_user3_rm3/new")]


def test_fition_duplicates_removed_and_reported(fition_samples: Path, tmp_path: Path) -> None:
    src = _sample(fition_samples, "walking_user1_rm1_10.pcap")
    folder = tmp_path / "walking_user1_rm1"
    folder.mkdir()
    shutil.copy(src, folder / "walking_user1_rm1_10.pcap")
    shutil.copy(src, folder / "walking_user1_rm1_99.pcap")
    index = index_dataset("fition", tmp_path)
    assert [e.path.name for e in index] == ["walking_user1_rm1_10.pcap"]  # first sorted kept
    assert index.duplicates_removed == 1
    (dup,) = index.duplicates
    assert dup.removed.name == "walking_user1_rm1_99.pcap"
    assert dup.kept.name == "walking_user1_rm1_10.pcap" and dup.same_labels
    summary = summarize("fition", tmp_path)
    assert summary["total"] == 1 and summary["duplicates_removed"] == 1
    assert summary["duplicates"] == [{
        "removed": "walking_user1_rm1/walking_user1_rm1_99.pcap",
        "kept": "walking_user1_rm1/walking_user1_rm1_10.pcap", "same_labels": True,
    }]


def test_duplicate_under_another_label_is_flagged(fition_samples: Path, tmp_path: Path) -> None:
    src = _sample(fition_samples, "falling_user1_rm1_1.pcap")
    for folder in ("falling_user1_rm1", "walking_user1_rm1"):
        (tmp_path / folder).mkdir()
        shutil.copy(src, tmp_path / folder / "capture.pcap")
    index = index_dataset("fition", tmp_path)
    assert [e.activity for e in index] == ["falling"]
    assert [d.same_labels for d in index.duplicates] == [False]


def test_fition_unrecognised_files_are_ignored_with_reasons(
    fition_samples: Path, tmp_path: Path
) -> None:
    good = tmp_path / "nm_user4_rm4"
    good.mkdir()
    shutil.copy(_sample(fition_samples, "nm_user4_rm4_11.pcap"), good / "nm_user4_rm4_11.pcap")
    shutil.copy(_sample(fition_samples, "nm_user2_rm2_10.pcap"), good / "walking_user1_rm1_3.pcap")
    shutil.copy(_sample(fition_samples, "sitdown_user3_rm3_20.pcap"), tmp_path / "loose.pcap")
    (good / "notes.txt").write_text("session notes\n")
    (good / "broken.pcap").write_bytes(b"not a capture at all")
    (good / "empty.pcap").write_bytes(b"")
    (tmp_path / "dance_user1_rm1").mkdir()
    shutil.copy(_sample(fition_samples, "walking_user2_rm2_11.pcap"), tmp_path / "dance_user1_rm1")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.pcap").write_bytes(b"ignored silently")

    index = index_dataset("fition", tmp_path)
    assert [e.path.name for e in index] == ["nm_user4_rm4_11.pcap"]
    reasons = {i.path.relative_to(tmp_path).as_posix(): i.reason for i in index.ignored}
    assert set(reasons) == {
        "loose.pcap", "nm_user4_rm4/walking_user1_rm1_3.pcap", "nm_user4_rm4/notes.txt",
        "nm_user4_rm4/broken.pcap", "nm_user4_rm4/empty.pcap",
        "dance_user1_rm1/walking_user2_rm2_11.pcap",
    }
    assert "not inside an <activity>_<user>_<room> folder" in reasons["loose.pcap"]
    assert "walking_user1_rm1" in reasons["nm_user4_rm4/walking_user1_rm1_3.pcap"]
    assert reasons["nm_user4_rm4/notes.txt"] == "not a .pcap file"
    assert "does not" in reasons["nm_user4_rm4/broken.pcap"]
    assert "empty file" in reasons["nm_user4_rm4/empty.pcap"]
    assert "'dance'" in reasons["dance_user1_rm1/walking_user2_rm2_11.pcap"]
    summary = summarize("fition", tmp_path)
    assert len(summary["ignored_files"]) == 6 and summary["total"] == 1


# --- WiAR -------------------------------------------------------------------------------------


def test_wiar_samples_index_activity_names(wiar_samples: Path) -> None:
    index = index_dataset("wiar", wiar_samples)
    assert len(index) == 16 and index.ignored == ()
    by_name = {e.path.name: e for e in index}
    assert by_name["csi_a1_1.dat"].activity == "horizontal arm wave"
    assert by_name["csi_a5_1.dat"].activity == "draw x"
    assert by_name["csi_a12_1.dat"].activity == "walk"
    assert by_name["csi_a16_1.dat"].activity == "squat"
    assert sorted(e.activity for e in index) == sorted(WIAR_ACTIVITIES)
    for e in index:
        assert e.identity is None and e.room is None
        assert e.session == "height_90" and e.format == "intel5300-dat"


def test_wiar_bad_names_are_ignored(wiar_samples: Path, tmp_path: Path) -> None:
    folder = tmp_path / "height_60"
    folder.mkdir()
    shutil.copy(wiar_samples / "csi_a3_1.dat", folder / "csi_a3_7.dat")
    shutil.copy(wiar_samples / "csi_a4_1.dat", folder / "csi_a17_1.dat")
    shutil.copy(wiar_samples / "csi_a5_1.dat", folder / "a5_1.dat")
    index = index_dataset("wiar", tmp_path)
    assert [(e.activity, e.session) for e in index] == [("two hands wave", "height_60")]
    reasons = {i.path.name: i.reason for i in index.ignored}
    assert reasons == {
        "csi_a17_1.dat": "activity number 17 is outside 1..16",
        "a5_1.dat": "name does not match csi_a<activity>_<n>.dat",
    }


# --- errors naming the folder -----------------------------------------------------------------


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoRecordingsError, match="holds no files") as err:
        index_dataset("fition", tmp_path)
    assert err.value.folder == str(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_folder_of_unrecognised_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello\n")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    for name in ("fition", "wiar", "ntu-fi-har", "ntu-fi-humanid", "recordings"):
        with pytest.raises(NoRecordingsError) as err:
            index_dataset(name, tmp_path)
        message = str(err.value)
        assert message.startswith(str(tmp_path)) and "among 2 files" in message
        assert "data.csv" in message and "readme.txt" in message
        assert get_dataset(name).layout in message


def test_missing_folder_and_file_instead_of_folder(tmp_path: Path) -> None:
    with pytest.raises(NoRecordingsError, match="no such folder") as err:
        index_dataset("wiar", tmp_path / "absent")
    assert err.value.folder == str(tmp_path / "absent")
    (tmp_path / "file.dat").write_bytes(b"x")
    with pytest.raises(NoRecordingsError, match="is not a folder"):
        index_dataset("wiar", tmp_path / "file.dat")


# --- splits -----------------------------------------------------------------------------------


def test_random_split_is_disjoint_by_recording_and_seeded() -> None:
    examples = _synthetic({"walk": 30, "fall": 20, "sit": 10})
    split = random_split(examples, seed=3, val=0.2, test=0.2)
    _assert_disjoint(split, examples)
    again = random_split(list(reversed(examples)), seed=3, val=0.2, test=0.2)
    assert again == split  # input order does not matter
    other = random_split(examples, seed=4, val=0.2, test=0.2)
    assert _ids(other.test) != _ids(split.test)


def test_random_split_is_stratified() -> None:
    examples = _synthetic({"walk": 30, "fall": 20, "sit": 10})
    counts = random_split(examples, seed=0, val=0.2, test=0.2).counts("activity")
    assert counts["test"] == {"fall": 4, "sit": 2, "walk": 6}
    assert counts["val"] == {"fall": 4, "sit": 2, "walk": 6}
    assert counts["train"] == {"fall": 12, "sit": 6, "walk": 18}


def test_random_split_keeps_segments_of_a_recording_together() -> None:
    examples = _synthetic({"walk": 12, "fall": 8}, segments=3)
    split = random_split(examples, seed=1, val=0.25, test=0.25)
    _assert_disjoint(split, examples)
    for part in split.parts().values():
        assert all(n == 3 for n in Counter(e.recording_id for e in part).values())


def test_random_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fractions"):
        random_split(_synthetic({"walk": 4}), seed=0, val=0.5, test=0.5)


def test_random_split_on_fition_samples(fition_samples: Path) -> None:
    examples = list(index_dataset("fition", fition_samples))
    split = random_split(examples, seed=0, val=0.25, test=0.25, stratify=None)
    _assert_disjoint(split, examples)
    assert (len(split.train), len(split.val), len(split.test)) == (4, 2, 2)
    assert random_split(examples, seed=0, val=0.25, test=0.25, stratify=None) == split


def test_kfold_tests_every_recording_once_and_is_stratified() -> None:
    examples = _synthetic({"walk": 15, "fall": 10, "sit": 5})
    folds = kfold(examples, k=5, seed=2)
    assert len(folds) == 5
    tested = Counter(e.recording_id for _, test in folds for e in test)
    assert set(tested.values()) == {1} and len(tested) == 30
    for train, test in folds:
        assert not _ids(train) & _ids(test)
        assert len(train) + len(test) == 30
        assert Counter(e.activity for e in test) == {"walk": 3, "fall": 2, "sit": 1}
    assert kfold(list(reversed(examples)), k=5, seed=2) == folds
    assert kfold(examples, k=5, seed=9) != folds


def test_kfold_rejects_impossible_k() -> None:
    with pytest.raises(ValueError, match="between 2"):
        kfold(_synthetic({"walk": 3}), k=4, seed=0)
    with pytest.raises(ValueError, match="between 2"):
        kfold(_synthetic({"walk": 3}), k=1, seed=0)


def test_split_by_user_on_fition_samples(fition_samples: Path) -> None:
    examples = list(index_dataset("fition", fition_samples))
    split = split_by(examples, key="identity", test_values=["user3"], val_values=["user4"])
    _assert_disjoint(split, examples)
    assert {e.identity for e in split.test} == {"user3"} and len(split.test) == 2
    assert {e.identity for e in split.val} == {"user4"}
    assert {e.identity for e in split.train} == {"user1", "user2"}
    by_room = split_by(examples, key="room", test_values=["rm1", "rm2"])
    assert {e.room for e in by_room.test} == {"rm1", "rm2"} and by_room.val == ()
    by_session = split_by(examples, key="session", test_values=["standup_user3_rm3/new"])
    assert [e.path.name for e in by_session.test] == ["standup_user3_rm3_1.pcap"]


def test_split_by_errors(fition_samples: Path, wiar_samples: Path) -> None:
    fition = list(index_dataset("fition", fition_samples))
    with pytest.raises(ValueError, match=r"\['user9'\] do not occur"):
        split_by(fition, key="identity", test_values=["user9"])
    with pytest.raises(ValueError, match="both test and validation"):
        split_by(fition, key="identity", test_values=["user1"], val_values=["user1"])
    with pytest.raises(ValueError, match="unknown split key"):
        split_by(fition, key="colour", test_values=["red"])
    with pytest.raises(ValueError, match="have none"):
        split_by(list(index_dataset("wiar", wiar_samples)), key="identity", test_values=["a"])


def test_cross_session_pairs_on_fition_samples(fition_samples: Path) -> None:
    examples = list(index_dataset("fition", fition_samples))
    runs = cross_session_splits(examples)
    assert [name for name, _, _ in runs] == [
        "user1->user2", "user2->user1", "user3->user4", "user4->user3",
    ]
    for name, train, test in runs:
        a, b = name.split("->")
        assert {e.identity for e in train} == {a} and {e.identity for e in test} == {b}
        assert not _ids(train) & _ids(test)
        # Same physical room, different session: rm1/rm2 or rm3/rm4.
        assert {e.room for e in train} | {e.room for e in test} in ({"rm1", "rm2"},
                                                                    {"rm3", "rm4"})
    with pytest.raises(ValueError, match="'user2'"):
        cross_session_splits([e for e in examples if e.identity != "user2"])


# --- summaries --------------------------------------------------------------------------------


def _check_summary(summary: dict[str, Any], name: str) -> None:
    assert set(summary) >= SUMMARY_KEYS and summary["dataset"] == name
    total = summary["total"]
    assert sum(summary["classes"].values()) == total
    assert sum(sum(c.values()) for c in summary["splits"].values()) == total
    assert set(summary["splits"]) == {"train", "val", "test"}
    for counts in summary["splits"].values():
        assert list(counts) == list(summary["classes"])
    for cls, n in summary["classes"].items():
        assert sum(summary["splits"][p][cls] for p in summary["splits"]) == n


def test_summaries_of_samples_add_up(fition_samples: Path, wiar_samples: Path) -> None:
    fition = summarize("fition", fition_samples)
    _check_summary(fition, "fition")
    assert fition["total"] == 8 and fition["duplicates_removed"] == 0
    assert fition["identities"] == {"user1": 2, "user2": 2, "user3": 2, "user4": 2}
    assert fition["sessions"]["standup_user3_rm3/new"] == 1
    assert fition["ignored_files"] == []
    wiar = summarize("wiar", wiar_samples, seed=5)
    _check_summary(wiar, "wiar")
    assert wiar["total"] == 16 and wiar["identities"] is None and wiar["rooms"] is None
    assert wiar["sessions"] == {"height_90": 16}
    assert summarize("wiar", wiar_samples, seed=5) == wiar


# --- NTU-Fi (SenseFi layout) ------------------------------------------------------------------


def test_ntu_fi_har_layout(tmp_path: Path) -> None:
    root = tmp_path / "NTU-Fi_HAR"
    _ntu_tree(root, {c: (3, 1) for c in NTU_FI_HAR_CLASSES})
    (root / "train_amp" / "jump").mkdir()
    scipy.io.savemat(root / "train_amp" / "jump" / "jump0.mat", {"CSIamp": np.ones((342, 20))})
    (root / "test_amp" / "box" / "box9.mat").write_bytes(b"\x00" * 64)
    index = index_dataset("ntu-fi-har", root)
    assert len(index) == 24 and index.counts() == {c: 4 for c in NTU_FI_HAR_CLASSES}
    assert {e.session for e in index} == {"train_amp", "test_amp"}
    assert all(e.identity is None and e.format == "ntu-fi-mat" for e in index)
    reasons = {i.path.name: i.reason for i in index.ignored}
    assert "'jump'" in reasons["jump0.mat"]
    assert "does not" in reasons["box9.mat"]
    # The published train/test partition, as a cross-domain split on the session.
    published = split_by(index.examples, key="session", test_values=["test_amp"])
    assert len(published.train) == 18 and len(published.test) == 6
    _check_summary(summarize("NTU-Fi_HAR", root), "ntu-fi-har")


def test_ntu_fi_humanid_layout_labels_identity(tmp_path: Path) -> None:
    root = tmp_path / "NTU-Fi-HumanID"
    _ntu_tree(root, {f"{p:03d}": (2, 3) for p in (1, 2, 3, 15)}, prefix="a")
    index = index_dataset("ntu-fi-humanid", root)
    assert index.label_key == "identity"
    assert index.counts() == {"001": 5, "002": 5, "003": 5, "015": 5}
    assert {e.activity for e in index} == {"walk"}
    summary = summarize("ntu-fi-humanid", root)
    _check_summary(summary, "ntu-fi-humanid")
    assert summary["classes"] == summary["identities"] == index.counts()
    assert summary["label"] == "identity"


def test_ntu_fi_parent_folder_holding_both_datasets(tmp_path: Path) -> None:
    _ntu_tree(tmp_path / "NTU-Fi_HAR", {"run": (2, 1), "walk": (1, 1)})
    _ntu_tree(tmp_path / "NTU-Fi-HumanID", {"004": (1, 1)}, prefix="b")
    har = index_dataset("ntu-fi-har", tmp_path)
    assert har.counts() == {"run": 3, "walk": 2}
    assert {i.reason for i in har.ignored} == {
        "class folder '004' is not one of box, circle, clean, fall, run, walk"
    }
    humanid = index_dataset("ntu-fi-humanid", tmp_path)
    assert humanid.counts() == {"004": 2}
    assert len(humanid.ignored) == 5


def test_ntu_fi_file_outside_split_folders_is_ignored(tmp_path: Path) -> None:
    _ntu_tree(tmp_path, {"fall": (1, 0)})
    scipy.io.savemat(tmp_path / "fall1.mat", {"CSIamp": np.ones((342, 20))})
    index = index_dataset("ntu-fi-har", tmp_path)
    assert len(index) == 1
    assert [i.reason for i in index.ignored] == [
        "not in a train_amp/<class>/ or test_amp/<class>/ folder"
    ]


# --- project recordings (HDF5) ---------------------------------------------------------------


@pytest.fixture
def recordings(fition_samples: Path, tmp_path: Path) -> Path:
    """Two project recordings converted from samples, labelled with time ranges."""
    from csi_edge.convert import convert

    root = tmp_path / "recordings"
    (root / "site1").mkdir(parents=True)
    convert(_sample(fition_samples, "walking_user1_rm1_10.pcap"), root / "site1" / "a.h5",
            labels=[(0.0, 5.0, "walking", "user1"), (5.0, 10.0, "nm", None),
                    (10.0, 11.0, None, "user1")])
    convert(_sample(fition_samples, "falling_user1_rm1_1.pcap"), root / "site1" / "b.h5",
            labels=[(0.0, 10.0, "falling", "user2")])
    return root


def test_recordings_one_example_per_labelled_range(recordings: Path) -> None:
    index = index_dataset("recordings", recordings)
    got = [(e.path.name, e.activity, e.identity, e.session, e.start, e.end) for e in index]
    assert got == [
        ("a.h5", "walking", "user1", "site1/a", 0.0, 5.0),
        ("a.h5", "nm", None, "site1/a", 5.0, 10.0),
        ("b.h5", "falling", "user2", "site1/b", 0.0, 10.0),
    ]
    assert index.recordings == 2 and {e.format for e in index} == {"hdf5"}
    a, nm, b = index.examples
    assert a.recording_id == nm.recording_id != b.recording_id
    summary = summarize("recordings", recordings)
    _check_summary(summary, "recordings")
    assert summary["total"] == 3 and summary["recordings"] == 2
    assert summary["identities"] == {"user1": 1, "user2": 1}


def test_recordings_split_keeps_a_file_on_one_side(recordings: Path) -> None:
    examples = list(index_dataset("recordings", recordings))
    for seed in range(6):
        split = random_split(examples, seed=seed, val=0.0, test=0.5, stratify=None)
        _assert_disjoint(split, examples)
        assert sorted(len(p) for p in (split.train, split.test)) == [1, 2]


def test_recordings_bad_files_ignored_and_copies_deduped(
    recordings: Path, fition_samples: Path
) -> None:
    import h5py

    from csi_edge.convert import convert

    shutil.copy(recordings / "site1" / "b.h5", recordings / "site1" / "c.h5")
    with h5py.File(recordings / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    convert(_sample(fition_samples, "nm_user2_rm2_10.pcap"), recordings / "unlabelled.h5")
    (recordings / "notes.h5").write_text("not hdf5\n")
    index = index_dataset("recordings", recordings)
    assert [e.path.name for e in index] == ["a.h5", "a.h5", "b.h5"]
    assert [(d.removed.name, d.kept.name) for d in index.duplicates] == [("c.h5", "b.h5")]
    reasons = {i.path.name: i.reason for i in index.ignored}
    assert set(reasons) == {"other.h5", "unlabelled.h5", "notes.h5"}
    assert "csi-pipeline-recording" in reasons["other.h5"]
    assert reasons["unlabelled.h5"] == "no time range with an activity in its labels dataset"
    assert "does not" in reasons["notes.h5"]


# --- full recordings in ../shared/data --------------------------------------------------------


@pytest.mark.shared_data
def test_full_fition(shared_fition: Path) -> None:
    index = index_dataset("fition", shared_fition)
    assert len(index) == 420 and index.duplicates_removed == 0
    assert index.counts() == {"standup": 87, "walking": 81, "getintobed": 69, "falling": 63,
                              "sitdown": 61, "nm": 59}
    assert set(index.counts()) == set(FITION_ACTIVITIES)
    assert set(index.counts("identity")) == {"user1", "user2", "user3", "user4"}
    assert index.counts("session")["standup_user3_rm3/old"] == 19
    assert index.counts("session")["standup_user3_rm3/new"] == 21
    # Each user was recorded in one room only: identity and room are the same partition.
    assert {(e.identity, e.room) for e in index} == {
        ("user1", "rm1"), ("user2", "rm2"), ("user3", "rm3"), ("user4", "rm4"),
    }
    summary = summarize("fition", shared_fition)
    _check_summary(summary, "fition")
    assert summary["total"] == 420
    assert summary["identities"] == {"user1": 110, "user2": 82, "user3": 128, "user4": 100}
    for name, train, test in cross_session_splits(index.examples):
        assert len(train) + len(test) in (192, 228), name
        assert {e.activity for e in train} == {e.activity for e in test} == set(
            FITION_ACTIVITIES
        )
    split = random_split(index.examples, seed=0)
    _assert_disjoint(split, list(index.examples))


@pytest.mark.shared_data
def test_full_wiar(shared_wiar: Path) -> None:
    index = index_dataset("wiar", shared_wiar)
    assert len(index) == 480 and index.ignored == ()
    assert index.counts() == {a: 30 for a in sorted(WIAR_ACTIVITIES)}
    summary = summarize("wiar", shared_wiar)
    _check_summary(summary, "wiar")
    assert summary["total"] == 480 and len(summary["classes"]) == 16
    assert summary["sessions"] == {"height_90": 480}
    folds = kfold(index.examples, k=5, seed=0)
    assert all(len(test) == 96 for _, test in folds)
