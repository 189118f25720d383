"""Training text from tensorflow-datasets, tokenised, packed into fixed-length samples.

Sources (DataConfig.source):
  "tfds":  a named TFDS text dataset ("pg19", "c4/en", ...) already prepared in array_record
           format under data_dir (a TPU VM), read with tfds.data_source (no TensorFlow needed).
  "local": local .txt files / directories, built once into a TFDS dataset (LocalText, a
           GeneratorBasedBuilder with file_format="array_record") under data_dir, then read the
           same way. The installed tfds builds array_record datasets without TensorFlow.
The text of each example is its feature ``text_key`` ("text" for local files; pg19 calls it
"book_text"); ``check_source`` checks the files / prepared dataset / feature name up front.
Documents are tokenised with any object with ``encode(text) -> list[int]``, joined into one
stream (separated by eos when given) and cut into samples of sample_len + 1 tokens (the extra
token is the last target; consecutive samples overlap by that one token). Each epoch visits
the samples in a numpy permutation seeded by (seed, epoch); the position {"epoch", "index"}
(plain ints, saved in checkpoints) resumes the exact order.
Limitation: the packed stream lives in host memory (int32); for pg19-size corpora set
max_documents or pre-shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

SOURCES = ("local", "tfds")


class DataError(ValueError):
    """A dataset is missing or unusable; the message names it and the data_dir."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "local"
    files: tuple[str, ...] = ()  # local: .txt files or directories of them
    tfds_name: str = "pg19"
    data_dir: str = "~/tensorflow_datasets"
    split: str = "train"
    text_key: str = "text"
    max_documents: int | None = None
    shuffle: bool = True

    def __post_init__(self):
        from lococo_jax.config import ConfigError

        if self.source not in SOURCES:
            raise ConfigError(f"config field 'data_source': {self.source!r} not in {SOURCES}")
        if self.source == "local" and not self.files:
            raise ConfigError("config field 'data_files': empty; 'local' data needs .txt files")


def _txt_files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.rglob("*.txt"))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"data file or directory not found: {p}")
    if not out:
        raise DataError(f"no .txt files in {list(paths)}")
    return out


def _local_builder_cls():
    import tensorflow_datasets as tfds

    class LocalText(tfds.core.GeneratorBasedBuilder):
        """Local .txt files as a one-split TFDS text dataset (one example per file)."""

        VERSION = tfds.core.Version("1.0.0")
        # No downloads, so no checksums file: finding one needs importlib_resources for a
        # builder defined inside a package (not installed here).
        url_infos = None

        def __init__(self, *, files: Sequence[Path] = (), **kwargs: Any):
            self._files = list(files)
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text(), "name": tfds.features.Text()}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, f in enumerate(self._files):
                yield i, {"text": f.read_text(encoding="utf-8"), "name": f.name}

    return LocalText


_BUILDER = None


def build_local(files: Sequence[str], data_dir: str) -> Any:
    """Build (once; reused when the files are unchanged) and return the TFDS data source of
    local text files. The dataset lives in data_dir/local_<hash of names and contents>."""
    global _BUILDER
    paths = _txt_files(files)
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    root = Path(os.path.expanduser(data_dir)) / f"local_{h.hexdigest()[:16]}"
    if _BUILDER is None:  # defining the class registers it with tfds; do it once
        _BUILDER = _local_builder_cls()
    builder = _BUILDER(files=paths, data_dir=str(root), file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source(split="train")


LOCAL_NAME = "local_text"  # the TFDS name of LocalText (tfds's snake_case of the class name)
LOCAL_FEATURES = ("name", "text")


def _tfds_builder(name: str, data_dir: str) -> Any:
    """The builder of a named TFDS dataset, checked to be registered and prepared in data_dir."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"TFDS dataset {name!r} is unknown to tfds ({e})") from None
    if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in data_dir {data_dir!r}; prepare it with "
            f"`tfds build {name} --data_dir {data_dir} --file_format array_record` first"
        )
    return builder


def _missing_key(dataset: str, key: str, keys) -> DataError:
    return DataError(
        f"dataset {dataset}: examples have no feature {key!r} (config field 'text_key'); "
        f"its features are {sorted(keys)}"
    )


def check_source(dcfg: DataConfig) -> None:
    """Everything about the data that can be checked without reading it (and without network
    beyond data_dir itself): local files exist and include .txt files; a named TFDS dataset is
    registered and prepared in data_dir; text_key is one of the dataset's features.
    Raises DataError. Cheap: meant to run before the model is loaded."""
    if dcfg.source == "local":
        _txt_files(dcfg.files)
        if dcfg.text_key not in LOCAL_FEATURES:
            raise _missing_key(f"{LOCAL_NAME!r} (local files)", dcfg.text_key, LOCAL_FEATURES)
        return
    data_dir = os.path.expanduser(dcfg.data_dir)
    builder = _tfds_builder(dcfg.tfds_name, data_dir)
    features = list(builder.info.features.keys())
    if dcfg.text_key not in features:
        raise _missing_key(f"{dcfg.tfds_name!r} in {data_dir!r}", dcfg.text_key, features)


def open_tfds(name: str, data_dir: str, split: str) -> Any:
    """A prepared named TFDS dataset (array_record) as a random-access data source."""
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir)
    _tfds_builder(name, data_dir)
    try:
        return tfds.data_source(name, data_dir=data_dir, split=split)
    except (NotImplementedError, ValueError) as e:
        raise DataError(
            f"TFDS dataset {name!r} in {data_dir!r} cannot be read without TensorFlow: it must "
            f"be prepared with file_format=array_record ({e})"
        ) from None


def load_documents(dcfg: DataConfig) -> list[str]:
    """The documents' text (feature dcfg.text_key of each example), at most max_documents."""
    if dcfg.source == "local":
        src = build_local(dcfg.files, dcfg.data_dir)
        where = f"{LOCAL_NAME!r} (local files in {os.path.expanduser(dcfg.data_dir)!r})"
    else:
        src = open_tfds(dcfg.tfds_name, dcfg.data_dir, dcfg.split)
        where = f"{dcfg.tfds_name!r} in {os.path.expanduser(dcfg.data_dir)!r}"
    n = len(src) if dcfg.max_documents is None else min(len(src), dcfg.max_documents)
    docs = []
    for i in range(n):
        example = src[i]
        if dcfg.text_key not in example:
            raise _missing_key(where, dcfg.text_key, example.keys())
        text = example[dcfg.text_key]
        docs.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    return docs


def pack(docs: Sequence[str], tokenizer: Tokenizer, sample_len: int, eos_id: int | None = None):
    """Tokens [num_samples, sample_len + 1] int32: consecutive windows of one token stream
    (sample i = stream[i * sample_len : (i + 1) * sample_len + 1]); the tail is dropped."""
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d)
        if eos_id is not None:
            ids.append(eos_id)
    stream = np.asarray(ids, np.int32)
    n = (len(stream) - 1) // sample_len
    if n < 1:
        raise DataError(
            f"the data has {len(stream)} tokens, fewer than one sample of {sample_len + 1}"
        )
    idx = np.arange(n)[:, None] * sample_len + np.arange(sample_len + 1)[None, :]
    return stream[idx]


class Loader:
    """Batches [batch, sample_len + 1] of packed samples in a seeded per-epoch order.

    ``position`` ({"epoch": int, "index": int}, the next batch) is JSON-able and restores the
    exact stream with ``set_position``. Multi-host: ``rows`` (sorted indices into the global
    batch, see train.process_rows) makes ``next`` return only those rows, [len(rows),
    sample_len + 1]: this process's share of the same global batch; None = the whole batch."""

    def __init__(
        self,
        samples: np.ndarray,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rows: np.ndarray | None = None,
    ):
        if len(samples) < batch_size:
            raise DataError(
                f"only {len(samples)} samples of {samples.shape[1]} tokens, fewer than "
                f"batch_size {batch_size}; add data or shrink batch_size / clean_period"
            )
        self.samples, self.batch_size, self.seed, self.shuffle = samples, batch_size, seed, shuffle
        self.batches_per_epoch = len(samples) // batch_size
        self.epoch, self.index = 0, 0
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        if self.rows is not None and (
            self.rows.ndim != 1 or np.any(self.rows < 0) or np.any(self.rows >= batch_size)
        ):
            raise DataError(f"rows {self.rows} are not indices into a batch of {batch_size}")

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def set_position(self, pos: dict[str, int]) -> None:
        self.epoch, self.index = int(pos["epoch"]), int(pos["index"])

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def next(self) -> np.ndarray:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)
        rows = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        if self.rows is not None:
            rows = rows[self.rows]
        return self.samples[rows]


def make_loader(
    dcfg: DataConfig,
    tokenizer: Tokenizer,
    sample_len: int,
    batch_size: int,
    seed: int,
    rows: np.ndarray | None = None,
) -> Loader:
    """Loader of global batches of batch_size (or, with ``rows``, this process's rows of them)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    samples = pack(load_documents(dcfg), tokenizer, sample_len, eos)
    return Loader(samples, batch_size, seed, dcfg.shuffle, rows)
