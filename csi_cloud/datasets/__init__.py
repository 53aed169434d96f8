"""Registry of named CSI datasets: files -> labelled examples, leak-free splits, summaries.

Indexing reads file names, folders and content hashes only (no CSI is decoded)::

    index = index_dataset("fition", "../shared/data/fition")
    split = random_split(index.examples, seed=0)          # by recording, stratified
    for name, train, test in cross_session_splits(index.examples):
        ...                                               # user1->user2, user2->user1, ...

See ``datasets/README.md`` for each dataset's source, license and layout.
"""

from ._layouts import (
    FITION_ACTIVITIES,
    FITION_SAME_ROOM_USERS,
    NTU_FI_HAR_CLASSES,
    WIAR_ACTIVITIES,
)
from ._model import (
    DatasetIndex,
    DatasetSpec,
    Duplicate,
    Example,
    IgnoredFile,
    UnknownDatasetError,
)
from ._registry import DATASETS, get_dataset, index_dataset, list_datasets
from ._splits import Split, cross_session_splits, kfold, random_split, split_by
from ._summary import summarize, summarize_index

__all__ = [
    "DATASETS",
    "FITION_ACTIVITIES",
    "FITION_SAME_ROOM_USERS",
    "NTU_FI_HAR_CLASSES",
    "WIAR_ACTIVITIES",
    "DatasetIndex",
    "DatasetSpec",
    "Duplicate",
    "Example",
    "IgnoredFile",
    "Split",
    "UnknownDatasetError",
    "cross_session_splits",
    "get_dataset",
    "index_dataset",
    "kfold",
    "list_datasets",
    "random_split",
    "split_by",
    "summarize",
    "summarize_index",
]
