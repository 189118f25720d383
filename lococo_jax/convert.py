"""Weight conversion: Hugging Face folders and GGUF files -> our params pytree -> orbax directory.

Conversion is rename + transpose + stack only: HF's split-half RoPE layout is kept, torch
``Linear.weight`` [out, in] becomes our [in, out], and per-layer tensors are stacked on a leading
layer axis L (the layout is documented in lococo_jax.llama).

A converted directory holds::

    config.json        cfg.to_hf_config()
    lococo_jax.json    marker: {"format": "lococo_jax-params", "version": 1, "source": ...}
    params/            the params pytree (orbax StandardCheckpointer)
    tokenizer files    copied from the HF folder, or built from the GGUF (save_pretrained)

It is written into a temporary sibling directory that is renamed into place at the end, so a
failed conversion leaves nothing at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lococo_jax import llama
from lococo_jax.config import ConfigError, LlamaConfig, RopeScaling

Params = dict[str, Any]

MARKER = "lococo_jax.json"
FORMAT = "lococo_jax-params"
FORMAT_VERSION = 1
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
# Our per-layer name -> (GGUF name under blk.{i}., transposed?)
GGUF_LAYER_NAMES: dict[str, tuple[str, bool]] = {
    "attn_norm": ("attn_norm.weight", False),
    "mlp_norm": ("ffn_norm.weight", False),
    "wq": ("attn_q.weight", True),
    "wk": ("attn_k.weight", True),
    "wv": ("attn_v.weight", True),
    "wo": ("attn_output.weight", True),
    "bq": ("attn_q.bias", False),
    "bk": ("attn_k.bias", False),
    "bv": ("attn_v.bias", False),
    "bo": ("attn_output.bias", False),
    "w_gate": ("ffn_gate.weight", True),
    "w_up": ("ffn_up.weight", True),
    "w_down": ("ffn_down.weight", True),
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
# GGUF files (llama.cpp).


def _gguf_fields(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata (arrays other than short ones are skipped)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - exotic metadata types are irrelevant to the model
            continue
    return out


def gguf_config(reader: Any, path: str | Path) -> LlamaConfig:
    """LlamaConfig from a GGUF file's llama.* / tokenizer.ggml.* metadata."""
    f = _gguf_fields(reader)
    arch = f.get("general.architecture")
    if arch != "llama":
        raise ConfigError(
            f"config field 'general.architecture' in {path}: {arch!r} is not supported; "
            "only 'llama' GGUF files can be converted"
        )

    def need(key: str) -> Any:
        if key not in f:
            raise ConfigError(f"config field '{key}' in {path}: missing from the GGUF metadata")
        return f[key]

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    kv_heads = int(f.get("llama.attention.head_count_kv", heads))
    head_dim = int(f.get("llama.attention.key_length", f.get("llama.rope.dimension_count", 0)))
    head_dim = head_dim or hidden // heads
    tensors = {t.name: t for t in reader.tensors}
    if "llama.vocab_size" in f:
        vocab = int(f["llama.vocab_size"])
    elif "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    else:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    if "rope_freqs.weight" in tensors:
        raise ConfigError(
            f"config field 'rope_freqs' in {path}: per-frequency RoPE factors (llama.cpp's export "
            "of llama3 scaling) are not supported; convert the Hugging Face checkpoint instead"
        )
    rope_scaling = None
    scaling_type = f.get("llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        factor = float(need("llama.rope.scaling.factor"))
        if scaling_type != "linear":
            raise ConfigError(
                f"config field 'llama.rope.scaling.type' in {path}: {scaling_type!r} is not "
                "supported (only linear)"
            )
        rope_scaling = RopeScaling("linear", factor)
    has_bias = "blk.0.attn_q.bias" in tensors
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(need("llama.feed_forward_length")),
            num_hidden_layers=int(need("llama.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(f.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(f.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in tensors,
            max_position_embeddings=int(f.get("llama.context_length", 4096)),
            attention_bias=has_bias,
            bos_token_id=_opt_int(f.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_opt_int(f.get("tokenizer.ggml.eos_token_id")),
        )
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's split halves).

    w: [n_head * head_dim, ...] in torch layout (rows = output features). llama.cpp exports
    ``w.reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)``; this is its inverse.
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | Path, dtype: Any = jnp.float32) -> tuple[LlamaConfig, Params]:
    """Read (and dequantise) a llama.cpp GGUF Llama into (config, params), cast to ``dtype``."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointFormatError(f"{path}: not a readable GGUF file ({e})") from e
    cfg = gguf_config(reader, path)
    src = _TensorSource()
    for t in reader.tensors:
        # GGUF lists dims fastest-first; numpy order (torch layout) is the reverse.
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))

        def load(t=t, shape=shape) -> np.ndarray:
            return (
                gguf.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
            )

        src.add(t.name, shape, path, load)
    top = {
        "embed": ("token_embd.weight", False),
        "final_norm": ("output_norm.weight", False),
        "lm_head": ("output.weight", True),
    }

    def fix(key: str, a: np.ndarray) -> np.ndarray:
        if key.endswith(("attn_q.weight", "attn_q.bias")):
            return unpermute_qk(a, cfg.num_attention_heads)
        if key.endswith(("attn_k.weight", "attn_k.bias")):
            return unpermute_qk(a, cfg.num_key_value_heads)
        return a

    params = _assemble(
        cfg,
        src,
        top,
        GGUF_LAYER_NAMES,
        "blk.{}.",
        lambda key: False,
        dtype,
        fix=fix,
        where=str(path),
    )
    return cfg, params


# ---------------------------------------------------------------------------------------------
# Orbax directories.


def _tmp_sibling(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"


def _write_atomically(dst: str | Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run ``write(tmp)`` on a fresh temporary sibling of dst, then rename it to dst."""
    dst = Path(dst).expanduser().resolve()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"destination already exists: {dst} (pass overwrite=True)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dst)
    try:
        tmp.mkdir()
        write(tmp)
        if dst.exists():  # overwrite: move the old one aside first so dst is never half-written
            old = _tmp_sibling(dst)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _save_into(directory: Path, params: Params, cfg: LlamaConfig, source: str | None) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_SUBDIR, params)
        ckptr.wait_until_finished()
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
    marker = {"format": FORMAT, "version": FORMAT_VERSION, "source": source}
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def save_params(
    params: Params, cfg: LlamaConfig, dst_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Write params (orbax) + config.json into ``dst_dir`` atomically; returns the resolved path."""
    return _write_atomically(dst_dir, lambda tmp: _save_into(tmp, params, cfg, None), overwrite)


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
    marker = json.loads((d / MARKER).read_text())
    if marker.get("format") != FORMAT or marker.get("version") != FORMAT_VERSION:
        raise CheckpointFormatError(f"{d / MARKER}: unknown format {marker}")
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
    if src.is_file():
        if src.suffix != ".gguf":
            raise ValueError(f"{src}: expected an HF checkpoint folder or a .gguf file")
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
