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

Scale (pg19: ~2B tokens): documents are read and tokenised one at a time and appended to an
int32 token file (``TokenCache``, built once, atomically, keyed by the data and the tokenizer)
that is then memory-mapped: host memory stays bounded by one document whatever the corpus
size, and each host reads from the file only the rows of each batch that it feeds. Every host
builds the cache once on its own disk (DataConfig.token_cache_dir; on a shared disk the first
to finish wins and the others reuse it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
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
    # Where TokenCache writes; None: data_dir/tokens, or ~/.cache/lococo_jax/tokens when
    # data_dir is a URL (gs://...: a memory map needs a local file).
    token_cache_dir: str | None = None

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


@contextlib.contextmanager
def _tfds_scratch() -> Iterator[None]:
    """Point tempfile at a folder removed on exit. Constructing a TFDS builder whose dataset is
    not prepared yet calls DatasetInfo.initialize_from_bucket, which makes an empty
    ``tempfile.mkdtemp("tfds")`` and never removes it (tensorflow-datasets 4.9.10): one stray
    /tmp/tmp*tfds per build without this."""
    old = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="lococo-tfds-") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = old


def files_digest(paths: Sequence[Path]) -> str:
    """16 hex digits of a sha256 over the files' names and contents, in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_local(files: Sequence[str], data_dir: str) -> Any:
    """Build (once; reused when the files are unchanged) and return the TFDS data source of
    local text files. The dataset lives in data_dir/local_<hash of names and contents>."""
    global _BUILDER
    paths = _txt_files(files)
    root = Path(os.path.expanduser(data_dir)) / f"local_{files_digest(paths)}"
    if _BUILDER is None:  # defining the class registers it with tfds; do it once
        _BUILDER = _local_builder_cls()
    with _tfds_scratch():
        builder = _BUILDER(files=paths, data_dir=str(root), file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source(split="train")


LOCAL_NAME = "local_text"  # the TFDS name of LocalText (tfds's snake_case of the class name)
LOCAL_FEATURES = ("name", "text")


def _tfds_builder(name: str, data_dir: str) -> Any:
    """The builder of a named TFDS dataset, checked to be registered and prepared in data_dir."""
    import tensorflow_datasets as tfds

    try:
        with _tfds_scratch():
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


def _open_source(dcfg: DataConfig) -> tuple[Any, str]:
    if dcfg.source == "local":
        src = build_local(dcfg.files, dcfg.data_dir)
        return src, f"{LOCAL_NAME!r} (local files in {os.path.expanduser(dcfg.data_dir)!r})"
    src = open_tfds(dcfg.tfds_name, dcfg.data_dir, dcfg.split)
    return src, f"{dcfg.tfds_name!r} in {os.path.expanduser(dcfg.data_dir)!r}"


def iter_documents(dcfg: DataConfig) -> Iterator[str]:
    """The documents' text (feature dcfg.text_key of each example), at most max_documents, one
    at a time (random-access reads: only the current example is in memory)."""
    src, where = _open_source(dcfg)
    n = len(src) if dcfg.max_documents is None else min(len(src), dcfg.max_documents)
    for i in range(n):
        example = src[i]
        if dcfg.text_key not in example:
            raise _missing_key(where, dcfg.text_key, example.keys())
        text = example[dcfg.text_key]
        yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def load_documents(dcfg: DataConfig) -> list[str]:
    """All documents as a list (small corpora and tests; training streams iter_documents)."""
    return list(iter_documents(dcfg))


def _token_chunks(docs: Iterable[str], tokenizer: Tokenizer, eos_id: int | None):
    for d in docs:
        ids = list(tokenizer.encode(d))
        if eos_id is not None:
            ids.append(eos_id)
        yield np.asarray(ids, np.int32)


class PackedSamples:
    """Samples [n, sample_len + 1] as a view of a token stream (an array or a memmap):
    sample i = stream[i * sample_len : (i + 1) * sample_len + 1]. Indexing with an int array
    reads only those rows."""

    def __init__(self, stream: np.ndarray, sample_len: int):
        n = (len(stream) - 1) // sample_len
        if n < 1:
            raise DataError(
                f"the data has {len(stream)} tokens, fewer than one sample of {sample_len + 1}"
            )
        self.stream, self.sample_len, self.n = stream, sample_len, n
        self.shape = (n, sample_len + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: Any) -> np.ndarray:
        idx = np.arange(self.n)[rows] if not isinstance(rows, np.ndarray) else rows
        offs = np.asarray(idx, np.int64)[..., None] * self.sample_len
        return np.asarray(self.stream[offs + np.arange(self.sample_len + 1)], np.int32)


def pack(docs: Sequence[str], tokenizer: Tokenizer, sample_len: int, eos_id: int | None = None):
    """Tokens [num_samples, sample_len + 1] int32 in memory (small corpora; see TokenCache)."""
    chunks = list(_token_chunks(docs, tokenizer, eos_id))
    stream = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    return PackedSamples(stream, sample_len)[np.arange(max((len(stream) - 1) // sample_len, 0))]


def tokenizer_id(tokenizer: Any) -> str:
    """A digest naming a tokenizer's vocabulary and rules (its serialised form where it has
    one), so a token cache is never reused across tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ident = backend.to_str() if backend is not None else type(tokenizer).__name__
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _data_id(dcfg: DataConfig) -> dict[str, Any]:
    if dcfg.source == "local":
        ident: dict[str, Any] = {"local": files_digest(_txt_files(dcfg.files))}
    else:
        ident = {"tfds": dcfg.tfds_name, "split": dcfg.split, "data_dir": dcfg.data_dir}
    return ident | {"text_key": dcfg.text_key, "max_documents": dcfg.max_documents}


class TokenCache:
    """The tokenised corpus as one int32 file ``tokens.bin`` (+ ``meta.json``) in
    token_cache_dir/<key>, key = digest of the data, the tokenizer and eos. ``build`` streams
    documents through the tokenizer into a temporary sibling folder and renames it into place,
    so a killed build leaves no cache (its temporary is removed, or, after a SIGKILL, swept by
    the next build). Memory: one document at a time, whatever the corpus size."""

    def __init__(self, dcfg: DataConfig, tokenizer: Tokenizer, eos_id: int | None):
        key = {"data": _data_id(dcfg), "tokenizer": tokenizer_id(tokenizer), "eos": eos_id}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        root = dcfg.token_cache_dir
        if root is None:
            url = "://" in dcfg.data_dir
            root = "~/.cache/lococo_jax/tokens" if url else os.path.join(dcfg.data_dir, "tokens")
        self.root = Path(os.path.expanduser(root))
        self.dir, self.key = self.root / f"tokens_{digest}", key
        self.dcfg, self.tokenizer, self.eos_id = dcfg, tokenizer, eos_id

    def exists(self) -> bool:
        return (self.dir / "meta.json").is_file()

    def build(self, progress: bool = False) -> None:
        if self.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{self.dir.name}.tmp-*"):  # from a SIGKILLed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.dir.name}.tmp-", dir=self.root))
        try:
            n_docs = n_tokens = 0
            with open(tmp / "tokens.bin", "wb") as f:
                for ids in _token_chunks(iter_documents(self.dcfg), self.tokenizer, self.eos_id):
                    f.write(ids.tobytes())
                    n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
            meta = {"key": self.key, "documents": n_docs, "tokens": n_tokens}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            try:
                os.replace(tmp, self.dir)
            except OSError:
                if not self.exists():  # not another host's finished build
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def stream(self) -> np.ndarray:
        """The token stream, memory-mapped (read-only)."""
        n = json.loads((self.dir / "meta.json").read_text())["tokens"]
        if n == 0:
            return np.zeros(0, np.int32)
        return np.memmap(self.dir / "tokens.bin", np.int32, mode="r", shape=(n,))


class Loader:
    """Batches [batch, sample_len + 1] of packed samples in a seeded per-epoch order.

    ``position`` ({"epoch": int, "index": int}, the next batch) is JSON-able and restores the
    exact stream with ``set_position``. Multi-host: ``rows`` (sorted indices into the global
    batch, see train.process_rows) makes ``next`` return only those rows, [len(rows),
    sample_len + 1]: this process's share of the same global batch; None = the whole batch."""

    def __init__(
        self,
        samples: np.ndarray | PackedSamples,
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
    """Loader of global batches of batch_size (or, with ``rows``, this process's rows of them),
    reading the memory-mapped TokenCache (built first if absent)."""
    cache = TokenCache(dcfg, tokenizer, getattr(tokenizer, "eos_token_id", None))
    cache.build()
    return Loader(PackedSamples(cache.stream(), sample_len), batch_size, seed, dcfg.shuffle, rows)
