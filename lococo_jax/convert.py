"""Weight conversion: Hugging Face folders and GGUF files (lococo_jax.gguf) -> our params pytree
-> orbax directory.

Conversion is rename + transpose + stack only: HF's split-half RoPE layout is kept, torch
``Linear.weight`` [out, in] becomes our [in, out], and per-layer tensors are stacked on a leading
layer axis L (the layout is documented in lococo_jax.llama).

A converted directory holds::

    config.json        cfg.to_hf_config()
    lococo_jax.json    marker: {"format": "lococo_jax-params", "version": 2, "source": ...,
                       "files": {relative path: sha256}} (checked on every load)
    params/            the params pytree (orbax StandardCheckpointer)
    tokenizer files    copied from the HF folder, or built from the GGUF (save_pretrained)

It is written into a temporary sibling ``.NAME.tmp-PID-XXXXXXXX`` that is renamed into place at
the end; an error, Ctrl-C, SIGTERM or SIGHUP removes it, and the next conversion to the same
place removes those a killed (SIGKILL) run left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lococo_jax import llama
from lococo_jax.config import LlamaConfig

Params = dict[str, Any]

MARKER = "lococo_jax.json"
FORMAT = "lococo_jax-params"
FORMAT_VERSION = 2  # 2: the marker lists every file's sha256 ("files"); 1 had none
READABLE_VERSIONS = (1, 2)
PARAMS_SUBDIR = "params"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
# Buffers some exporters write that carry no weights (recomputed from the config).
HARMLESS_SUFFIXES = (
    "rotary_emb.inv_freq",
    "rotary_emb.cos_cached",
    "rotary_emb.sin_cached",
)

# Our per-layer name -> (HF name under model.layers.{i}., transposed?)
HF_LAYER_NAMES: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "b_gate": ("mlp.gate_proj.bias", False),
    "b_up": ("mlp.up_proj.bias", False),
    "b_down": ("mlp.down_proj.bias", False),
}


class CheckpointFormatError(ValueError):
    """A checkpoint's tensors do not fit its config (missing, extra or misshapen tensors)."""


# ---------------------------------------------------------------------------------------------
# Tensor sources: name -> (shape, loader), so shapes are validated before anything is read.


class _TensorSource:
    """Lazy access to the tensors of one checkpoint (one or several files)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.files: dict[str, Path] = {}
        self._loaders: dict[str, Callable[[], np.ndarray]] = {}

    def add(self, key: str, shape: tuple[int, ...], file: Path, loader: Callable[[], np.ndarray]):
        self.shapes[key] = tuple(int(s) for s in shape)
        self.files[key] = file
        self._loaders[key] = loader

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self._loaders[key]())


def _safetensors_source(files: list[Path]) -> _TensorSource:
    from safetensors import safe_open

    src = _TensorSource()
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())

                def load(file=file, key=key) -> np.ndarray:
                    with safe_open(str(file), framework="numpy") as g:
                        return g.get_tensor(key)

                src.add(key, shape, file, load)
    return src


def _torch_source(files: list[Path]) -> _TensorSource:
    import torch

    src = _TensorSource()
    for file in files:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        for key, t in state.items():

            def load(t=t) -> np.ndarray:
                t = t.detach()
                if t.dtype == torch.bfloat16:  # numpy has no bf16: go through ml_dtypes
                    import ml_dtypes

                    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                return t.numpy()

            src.add(key, tuple(t.shape), file, load)
    return src


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointFormatError(f"{index}: not a valid shard index ({e!r})") from None
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"shard listed in {index} not found: {f}")
    return files


def _hf_source(folder: Path) -> _TensorSource:
    """The tensors of an HF folder: safetensors (single or sharded) or pytorch_model.bin."""
    candidates = [
        ("model.safetensors", _safetensors_source, False),
        ("model.safetensors.index.json", _safetensors_source, True),
        ("pytorch_model.bin", _torch_source, False),
        ("pytorch_model.bin.index.json", _torch_source, True),
    ]
    for name, make, is_index in candidates:
        path = folder / name
        if path.is_file():
            return make(_index_files(path) if is_index else [path])
    names = ", ".join(c[0] for c in candidates)
    raise FileNotFoundError(f"no weights in {folder}: expected one of {names}")


# ---------------------------------------------------------------------------------------------
# Assembling our pytree from named tensors.


def _assemble(
    cfg: LlamaConfig,
    src: _TensorSource,
    top_names: dict[str, tuple[str, bool]],
    layer_names: dict[str, tuple[str, bool]],
    layer_prefix: str,
    ignored: Callable[[str], bool],
    dtype: Any,
    fix: Callable[[str, np.ndarray], np.ndarray] | None = None,
    where: str = "",
) -> Params:
    """Validate every tensor against ``llama.param_shapes(cfg)`` first, then read, transpose, stack.

    top_names / layer_names: our name -> (source key, transposed?); a layer source key is
    ``layer_prefix.format(i) + name``. ``fix(key, array)`` post-processes a loaded tensor (the
    GGUF q/k un-permutation). Raises CheckpointFormatError naming the file and key.
    """
    shapes = llama.param_shapes(cfg)
    # our path -> list of (source key, expected source shape, transposed?)
    plan: dict[tuple[str, ...], list[tuple[str, tuple[int, ...], bool]]] = {}
    for name, shape in shapes.items():
        if name == "layers":
            continue
        key, tr = top_names[name]
        plan[(name,)] = [(key, tuple(reversed(shape)) if tr else tuple(shape), tr)]
    for name, shape in shapes["layers"].items():
        hf_name, tr = layer_names[name]
        per_layer = tuple(reversed(shape[1:])) if tr else tuple(shape[1:])
        plan[("layers", name)] = [
            (layer_prefix.format(i) + hf_name, per_layer, tr) for i in range(cfg.num_hidden_layers)
        ]

    wanted = {key for entries in plan.values() for key, _, _ in entries}
    missing = [key for key in sorted(wanted) if key not in src.shapes]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise CheckpointFormatError(
            f"{where}: missing tensors for the config: {missing[:10]}{more}"
        )
    extra = [k for k in sorted(src.shapes) if k not in wanted and not ignored(k)]
    if extra:
        more = f" (and {len(extra) - 10} more)" if len(extra) > 10 else ""
        raise CheckpointFormatError(
            f"{where}: unexpected tensors not used by a Llama with this config: {extra[:10]}{more}"
        )
    for entries in plan.values():
        for key, expected, _ in entries:
            if src.shapes[key] != expected:
                raise CheckpointFormatError(
                    f"{src.files[key]}: tensor '{key}' has shape {list(src.shapes[key])}, "
                    f"expected {list(expected)} from the config"
                )

    def load(key: str, tr: bool) -> np.ndarray:
        a = src.get(key)
        if fix is not None:
            a = fix(key, a)
        return a.T if tr else a

    params: Params = {"layers": {}}
    for path, entries in plan.items():
        if path[0] == "layers":
            arr = np.stack([load(key, tr) for key, _, tr in entries])
            params["layers"][path[1]] = jnp.asarray(arr, dtype=dtype)
        else:
            key, _, tr = entries[0]
            params[path[0]] = jnp.asarray(load(key, tr), dtype=dtype)
    return params


# ---------------------------------------------------------------------------------------------
# Hugging Face folders.


def _require_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a checkpoint folder: {folder}")
    return folder


def read_hf_config(path: str | Path) -> LlamaConfig:
    """LlamaConfig from an HF config.json (transformers 4 or 5 format)."""
    return LlamaConfig.from_json(path)


def load_hf_checkpoint(folder: str | Path, dtype: Any = jnp.float32) -> tuple[LlamaConfig, Params]:
    """Read a Hugging Face Llama folder (config.json + safetensors / pytorch_model.bin, single or
    sharded) into (config, params) in the layout of lococo_jax.llama, cast to ``dtype``."""
    folder = _require_dir(folder)
    cfg = read_hf_config(folder / "config.json")
    src = _hf_source(folder)
    embed_key, head_key = "model.embed_tokens.weight", "lm_head.weight"
    top = {
        "embed": (embed_key, False),
        "final_norm": ("model.norm.weight", False),
        "lm_head": (head_key, True),
    }
    tied_head = cfg.tie_word_embeddings and head_key in src.shapes

    def ignored(key: str) -> bool:
        return key.endswith(HARMLESS_SUFFIXES) or (tied_head and key == head_key)

    params = _assemble(
        cfg, src, top, HF_LAYER_NAMES, "model.layers.{}.", ignored, dtype, where=str(folder)
    )
    if tied_head and not np.array_equal(src.get(head_key), src.get(embed_key)):
        raise CheckpointFormatError(
            f"{src.files[head_key]}: tensor '{head_key}' differs from '{embed_key}' but config "
            "field 'tie_word_embeddings' is true"
        )
    return cfg, params


# ---------------------------------------------------------------------------------------------
# Orbax directories.


def _tmp_sibling(dst: Path) -> Path:
    """A hidden sibling named after this process, so a later run can tell a dead run's leftover
    (its pid is gone) from a conversion still in progress."""
    return dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(dst: str | Path) -> list[Path]:
    """Remove the ``.NAME.tmp-*`` siblings of dst that a killed conversion left behind (their
    process is gone); report on stderr the ones whose writer may still be running. -> removed."""
    dst = Path(dst)
    removed = []
    if not dst.parent.is_dir():
        return removed
    for p in dst.parent.iterdir():
        m = _TMP_RE.match(p.name)
        if not m or m["name"] != dst.name:
            continue
        pid = int(m["pid"]) if m["pid"] else None
        if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
            print(
                f"note: {p} belongs to a conversion still running (pid {pid}); left alone",
                file=sys.stderr,
            )
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        print(f"note: removed {p}, left behind by an interrupted conversion", file=sys.stderr)
        removed.append(p)
    return removed


@contextlib.contextmanager
def _interrupts_raise():
    """SIGTERM / SIGHUP raise (like Ctrl-C) while a conversion writes, so its ``finally`` removes
    the temporary folder; SIGKILL cannot be caught: clean_stale_temporaries handles that."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"interrupted by signal {signum}")

    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s]
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def check_destination(dst: str | Path, overwrite: bool, src: str | Path | None = None) -> Path:
    """The resolved destination, or a clear error: it exists (without overwrite), a parent is a
    file, or it is (or holds) the source."""
    dst = Path(dst).expanduser().resolve()
    for parent in dst.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"destination {dst}: {parent} is a file, not a folder; pick another path"
                )
            break
    if src is not None:
        src = Path(src).expanduser().resolve()
        if dst == src or dst in src.parents:
            raise ValueError(f"destination {dst} would replace the source {src}; pick another path")
    if dst.exists():
        if not overwrite:
            raise FileExistsError(
                f"destination already exists: {dst} (pass --overwrite, or overwrite=True, to "
                "replace it)"
            )
        if not dst.is_dir() or (any(dst.iterdir()) and not is_converted(dst)):
            raise FileExistsError(
                f"destination {dst} exists and is not a converted checkpoint; --overwrite only "
                "replaces one (remove it yourself if you mean it)"
            )
    return dst


def _write_atomically(dst: str | Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run ``write(tmp)`` on a fresh temporary sibling of dst, then rename it to dst."""
    dst = check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dst)
    tmp = _tmp_sibling(dst)
    old = None
    try:
        with _interrupts_raise():
            tmp.mkdir()
            write(tmp)
            _record_checksums(tmp)
            if dst.exists():  # overwrite: move the old one aside so dst is never half-written
                old = _tmp_sibling(dst)
                os.replace(dst, old)
            os.replace(tmp, dst)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return dst


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _record_checksums(directory: Path) -> None:
    """Add every file's sha256 (relative path -> hex) to the marker."""
    marker = json.loads((directory / MARKER).read_text())
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)
    marker["files"] = {str(p.relative_to(directory)): _sha256(p) for p in files}
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def verify_checksums(directory: str | Path) -> None:
    """Raise CheckpointFormatError naming the first file that is missing or differs from the
    sha256 recorded at conversion (version-1 checkpoints have none: nothing to verify)."""
    d = Path(directory)
    marker = json.loads((d / MARKER).read_text())
    for rel, want in marker.get("files", {}).items():
        f = d / rel
        if not f.is_file():
            raise CheckpointFormatError(
                f"{f}: missing from the converted checkpoint {d}; convert it again"
            )
        if _sha256(f) != want:
            raise CheckpointFormatError(
                f"{f}: damaged (its sha256 differs from the one recorded at conversion); "
                "convert the checkpoint again"
            )


def _save_into(directory: Path, params: Params, cfg: LlamaConfig, source: str | None) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_SUBDIR, params)
        ckptr.wait_until_finished()
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
    marker = {"format": FORMAT, "version": FORMAT_VERSION, "source": source}
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def save_params(
    params: Params,
    cfg: LlamaConfig,
    dst_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write params (orbax) + config.json (+ the tokenizer's files, when it has
    ``save_pretrained``) into ``dst_dir`` atomically, every file checksummed; returns the
    resolved path."""

    def write(tmp: Path) -> None:
        _save_into(tmp, params, cfg, None)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))

    return _write_atomically(dst_dir, write, overwrite)


def is_converted(directory: str | Path) -> bool:
    """True when ``directory`` is a complete converted checkpoint (written by save_params)."""
    d = Path(directory)
    return (d / MARKER).is_file() and (d / "config.json").is_file() and (d / PARAMS_SUBDIR).is_dir()


def load_params(directory: str | Path, dtype: Any = None) -> tuple[LlamaConfig, Params]:
    """Restore (config, params) written by save_params / convert; bit-exact when dtype is None,
    otherwise every leaf is cast to ``dtype``."""
    import orbax.checkpoint as ocp

    d = Path(directory).expanduser().resolve()
    if not d.exists():
        raise FileNotFoundError(f"converted checkpoint not found: {d}")
    if not is_converted(d):
        raise FileNotFoundError(
            f"{d} is not a converted lococo_jax checkpoint (expected {MARKER}, config.json and "
            f"{PARAMS_SUBDIR}/); convert it first: python -m lococo_jax convert SRC {d}"
        )
    try:
        marker = json.loads((d / MARKER).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{d / MARKER}: not valid JSON ({e}); convert again") from None
    if marker.get("format") != FORMAT or marker.get("version") not in READABLE_VERSIONS:
        raise CheckpointFormatError(
            f"{d / MARKER}: unknown format {marker.get('format')!r} version "
            f"{marker.get('version')!r} (this code reads {FORMAT!r} {READABLE_VERSIONS})"
        )
    verify_checksums(d)
    cfg = LlamaConfig.from_json(d / "config.json")
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(d / PARAMS_SUBDIR)
        tree = getattr(meta, "item_metadata", meta)
        device = jax.devices()[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree
        )
        params = ckptr.restore(d / PARAMS_SUBDIR, target)
    params = _plain(params)
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    return cfg, params


def _plain(tree: Any) -> Any:
    """Orbax may hand back its own mapping types; make them plain dicts."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _copy_tokenizer(folder: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dst / name)


def convert(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """HF folder or .gguf file -> converted orbax directory at ``dst`` (with the tokenizer).

    Atomic: on any error nothing is left at ``dst``. Returns the resolved destination.
    """
    return convert_and_load(src, dst, overwrite=overwrite)[0]


def convert_and_load(
    src: str | Path, dst: str | Path, *, overwrite: bool = False
) -> tuple[Path, LlamaConfig, Params]:
    """Like ``convert``, also returning the fp32 (config, params) it wrote (no re-read)."""
    src = Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"conversion source not found: {src}")
    check_destination(dst, overwrite, src)  # before the (slow) read of the source
    if src.is_file():
        if src.suffix != ".gguf":
            raise ValueError(f"{src}: expected an HF checkpoint folder or a .gguf file")
        from lococo_jax.gguf import load_gguf

        cfg, params = load_gguf(src)

        def write(tmp: Path) -> None:
            _save_into(tmp, params, cfg, src.name)
            from lococo_jax.tokenizer import load_tokenizer

            load_tokenizer(src).save_pretrained(str(tmp))

    else:
        cfg, params = load_hf_checkpoint(src)

        def write(tmp: Path) -> None:
            _save_into(tmp, params, cfg, src.name)
            _copy_tokenizer(src, tmp)

    return _write_atomically(dst, write, overwrite), cfg, params
