"""The TFDS pipeline: built offline from local text, exact packing, seeded order, resume."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from lococo_jax import data
from lococo_jax.tokenizer import ByteTokenizer

TEXT = Path(__file__).resolve().parent / "data" / "austen_sample.txt"


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("txt")
    (root / "a.txt").write_text(TEXT.read_text()[:20000])
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text("second document. " * 50)
    dcfg = data.DataConfig(files=(str(root),), data_dir=str(tmp_path_factory.mktemp("tfds")))
    return dcfg, data.load_documents(dcfg)


def test_local_tfds_build_and_read(docs):
    dcfg, texts = docs
    assert len(texts) == 2 and texts[1].startswith("second document.")
    assert texts[0] == TEXT.read_text()[:20000]
    roots = list(Path(dcfg.data_dir).glob("local_*/local_text/1.0.0/*.array_record*"))
    assert roots, "expected an array_record TFDS dataset in data_dir"
    assert data.load_documents(dcfg) == texts  # rebuilt from the prepared dataset


def test_pack_exact_lengths(docs):
    _, texts = docs
    tok = ByteTokenizer()
    stream = [t for d in texts for t in tok.encode(d)]
    samples = data.pack(texts, tok, 32)
    assert samples.shape == ((len(stream) - 1) // 32, 33) and samples.dtype == np.int32
    np.testing.assert_array_equal(samples[5], stream[5 * 32 : 6 * 32 + 1])
    np.testing.assert_array_equal(samples[1][0], samples[0][-1])  # last target = next token
    with pytest.raises(data.DataError, match="fewer than one sample"):
        data.pack(["short"], tok, 32)


def _take(loader, n):
    return [loader.next() for _ in range(n)]


def test_seeded_order_and_resume(docs):
    _, texts = docs
    samples = data.pack(texts, ByteTokenizer(), 64)[:30]  # 7 batches an epoch
    a = _take(data.Loader(samples, 4, seed=1), 12)
    b = _take(data.Loader(samples, 4, seed=1), 12)
    c = _take(data.Loader(samples, 4, seed=2), 12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    epoch = data.Loader(samples, 4, seed=1).batches_per_epoch
    assert epoch < 12  # the run crosses an epoch boundary
    first = data.Loader(samples, 4, seed=1)
    _take(first, 7)
    pos = first.position
    resumed = data.Loader(samples, 4, seed=1)
    resumed.set_position(dict(pos))
    for x, y in zip(_take(resumed, 5), a[7:12], strict=True):
        np.testing.assert_array_equal(x, y)


def test_missing_datasets_error_clearly(tmp_path):
    with pytest.raises(data.DataError, match="pg19.*not prepared in data_dir.*empty_dir"):
        data.open_tfds("pg19", str(tmp_path / "empty_dir"), "train")
    with pytest.raises(data.DataError, match="no_such_dataset_xyz"):
        data.open_tfds("no_such_dataset_xyz", str(tmp_path), "train")
    with pytest.raises(data.DataError, match="not found: .*missing.txt"):
        data.load_documents(data.DataConfig(files=(str(tmp_path / "missing.txt"),)))
    with pytest.raises(data.DataError, match="fewer than batch_size 99"):
        data.Loader(np.zeros((3, 9), np.int32), 99, 0)


def test_text_key_mismatch_names_dataset_key_and_features(docs):
    import dataclasses

    dcfg, _ = docs
    bad = dataclasses.replace(dcfg, text_key="book_text")
    # Examples of the (built) local TFDS dataset have "text" and "name", not pg19's "book_text".
    with pytest.raises(data.DataError, match=r"local_text.*'book_text'.*\['name', 'text'\]"):
        data.load_documents(bad)
    with pytest.raises(data.DataError, match=r"'book_text'.*\['name', 'text'\]"):
        data.check_source(bad)  # the same, found without reading the data
    data.check_source(dcfg)


def test_loader_rows_split_the_global_batch(docs):
    _, texts = docs
    samples = data.pack(texts, ByteTokenizer(), 64)[:30]
    full = _take(data.Loader(samples, 4, seed=3), 9)
    halves = [_take(data.Loader(samples, 4, seed=3, rows=np.array(r)), 9) for r in ([0, 1], [2, 3])]
    for f, a, b in zip(full, *halves, strict=True):
        np.testing.assert_array_equal(np.concatenate([a, b]), f)
    with pytest.raises(data.DataError, match="not indices into a batch of 4"):
        data.Loader(samples, 4, seed=3, rows=np.array([4]))


def test_token_cache_packs_exactly_like_pack_and_streams_from_disk(tmp_path):
    """The memory-mapped cache gives the same samples as the in-memory packer on the Austen
    text, reads only the rows asked for, is keyed by data + tokenizer, and a killed build's
    temporaries are swept by the next build."""
    austen = Path(__file__).resolve().parents[1] / "data" / "austen"
    files = (str(austen / "persuasion.txt"), str(austen / "northangerabbey.txt"))
    dcfg = data.DataConfig(files=files, data_dir=str(tmp_path / "tfds"))
    tok = ByteTokenizer()
    ref = data.pack(data.load_documents(dcfg), tok, 512)
    cache = data.TokenCache(dcfg, tok, None)
    stale = cache.root / f".{cache.dir.name}.tmp-killed"
    stale.mkdir(parents=True)
    cache.build()
    assert not stale.exists() and cache.exists()
    stream = cache.stream()
    assert isinstance(stream, np.memmap) and stream.dtype == np.int32
    packed = data.PackedSamples(stream, 512)
    assert packed.shape == ref.shape
    rows = np.array([0, 7, len(ref) - 1, 3])
    np.testing.assert_array_equal(packed[rows], ref[rows])
    np.testing.assert_array_equal(packed[np.arange(len(ref))], ref)
    # Another tokenizer or eos: another cache.
    assert data.TokenCache(dcfg, tok, 0).dir != cache.dir
    # The loader reads through it: the same batches as over the in-memory samples.
    loader = data.make_loader(dcfg, tok, 512, 4, seed=3)
    mem = data.Loader(ref, 4, seed=3)
    for _ in range(3):
        np.testing.assert_array_equal(loader.next(), mem.next())


def test_building_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    """tfds 4.9.10 makes an empty mkdtemp("tfds") per builder of an unprepared dataset; the
    build must not leave it (or anything else) in the system temp dir."""
    scratch = tmp_path / "system_tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    (tmp_path / "a.txt").write_text("a fresh document. " * 40)
    dcfg = data.DataConfig(files=(str(tmp_path / "a.txt"),), data_dir=str(tmp_path / "tfds"))
    assert data.load_documents(dcfg)[0].startswith("a fresh document.")
    assert sorted(p.name for p in scratch.iterdir()) == []
    assert tempfile.tempdir == str(scratch)
