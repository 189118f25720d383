"""Trained LoCoCo compressor weights alone (params["lococo"]): small, shareable files.

Format: one safetensors file with flat keys ``convs.{i}.w`` [L, k, in, U], ``convs.{i}.b``
[L, U], ``normalizer`` [L], and metadata holding the CompressionConfig (JSON) and free-form
provenance (model, command, data split). U = out unless a layer's output channels repeat (a file
grown by ``resize`` repeats each trained channel): then only the U distinct channels are stored,
with ``convs.{i}.take`` [out] (int32) giving each output channel's stored one. safetensors
rather than orbax because the file is meant to be committed, diffed by size, and read without a
checkpoint directory layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save, save_file

from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.policies import lococo

ASSETS = Path(__file__).resolve().parent / "assets" / "compressors"


def save_compressors(
    path: str | Path,
    params: dict[str, Any],
    ccfg: CompressionConfig,
    meta: dict[str, Any] | None = None,
    conv_dtype: str = "float32",
    model: dict[str, str] | None = None,
) -> Path:
    """Write params (the lococo subtree) atomically: a temp file renamed into place. A URL
    (gs://...) is written through etils.epath (object stores write whole objects anyway).

    model: the base model's ``model_fingerprint`` (architecture and weights hash); loading the
    file for another model is then an error. conv_dtype "float16" halves the file (the
    committed M=128 weights: 20.6 -> 10.3 MB); the conv weights are ~N(0, 1), well inside
    float16's range. Loading gives float32 either way.
    """
    if conv_dtype not in ("float32", "float16"):
        raise ValueError(f"conv_dtype must be float32 or float16, got {conv_dtype!r}")
    tensors = {"normalizer": np.ascontiguousarray(params["normalizer"], np.float32)}
    for i, conv in enumerate(params["convs"]):
        w = np.asarray(conv["w"], np.float32).astype(conv_dtype)
        b = np.asarray(conv["b"], np.float32)
        repeated = _repeated_channels(w, b)
        if repeated is not None:
            kept, take = repeated
            w, b = w[..., kept], b[..., kept]
            tensors[f"convs.{i}.take"] = take
        # contiguous: safetensors (0.8) writes a strided view's underlying buffer, not its elements
        tensors[f"convs.{i}.w"] = np.ascontiguousarray(w)
        tensors[f"convs.{i}.b"] = np.ascontiguousarray(b)
    metadata = {
        "compression_config": json.dumps(dataclasses.asdict(ccfg)),
        "meta": json.dumps(meta or {}),
    }
    if model is not None:
        metadata["model"] = json.dumps(model)
    if "://" in str(path):
        from etils import epath

        epath.Path(str(path)).write_bytes(save(tensors, metadata=metadata))
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the file private to its writer
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _repeated_channels(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """w [..., out], b [..., out] -> None if every output channel is distinct, else (kept [U]:
    each distinct channel's first occurrence, in order; take [out] int32: channel j's index
    among them), so that w == w[..., kept][..., take]."""
    out = w.shape[-1]
    rows = np.concatenate(
        [np.moveaxis(w, -1, 0).reshape(out, -1).astype(np.float32), b.reshape(-1, out).T], axis=1
    )
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    if len(first) == out:
        return None
    order = np.argsort(first)
    rank = np.empty(len(first), np.int32)
    rank[order] = np.arange(len(first), dtype=np.int32)
    return first[order], rank[inverse.reshape(-1)]


def _expand(path: str | Path, i: int, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Conv layer i's {"w", "b"} with a stored ``take`` index applied (see the module doc)."""
    w, b = tensors[f"convs.{i}.w"], tensors[f"convs.{i}.b"]
    take = tensors.get(f"convs.{i}.take")
    if take is None:
        return {"w": w, "b": b}
    stored = w.shape[-1]
    if take.ndim != 1 or not np.issubdtype(take.dtype, np.integer) or take.size == 0:
        raise ValueError(f"{path}: convs.{i}.take must be a non-empty 1-D integer index")
    if take.min() < 0 or take.max() >= stored or b.shape[-1] != stored:
        raise ValueError(
            f"{path}: convs.{i}.take indexes {stored} stored channels (w {w.shape}, b {b.shape}) "
            f"but holds values {int(take.min())}..{int(take.max())}"
        )
    return {"w": w[..., take], "b": b[..., take]}


def load_compressors(
    path: str | Path, cfg: LlamaConfig, model: dict[str, str] | None = None
) -> tuple[dict[str, Any], CompressionConfig, dict[str, Any]]:
    """-> (lococo params (float32), the CompressionConfig they were trained with, provenance).

    The file must have been trained for this model: its architecture must be cfg's, and, when
    ``model`` (model_fingerprint of the params it will run with) is given, its weights hash
    too (see check_binding)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressor weights not found: {path}")
    try:
        stored, ccfg, meta = _read(path)
        bound = stored_model(path)
    except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable compressor file ({e})") from None
    check_binding(path, bound, meta, cfg, model)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), stored)
    expected = jax.eval_shape(lambda: lococo.init_params(jax.random.PRNGKey(0), cfg, ccfg))
    for (kp, got), want in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected), strict=True
    ):
        if got.shape != want.shape:
            raise ValueError(
                f"{path}: tensor {jax.tree_util.keystr(kp)} has shape {got.shape}, but the model "
                f"(layers={cfg.num_hidden_layers}, head_dim={cfg.head_dim}) with this "
                f"compression config expects {want.shape}"
            )
    return params, ccfg, meta


def _read(path: str | Path) -> tuple[dict[str, Any], CompressionConfig, dict[str, Any]]:
    """-> (the stored numpy tensors as a lococo params tree, CompressionConfig, provenance)."""
    with safe_open(str(path), framework="numpy") as f:
        md = f.metadata() or {}
    if "compression_config" not in md:
        raise ValueError(f"{path}: no 'compression_config' metadata; not a compressor file")
    ccfg = CompressionConfig.from_dict(json.loads(md["compression_config"]), source=str(path))
    tensors = load_file(str(path))
    params = {
        "convs": [_expand(path, i, tensors) for i in range(ccfg.n_convlayer)],
        "normalizer": tensors["normalizer"],
    }
    return params, ccfg, json.loads(md.get("meta", "{}"))


def architecture(cfg: LlamaConfig) -> str:
    """The fields that decide a compressor's shapes and what its inputs mean, as one string."""
    return (
        f"llama layers={cfg.num_hidden_layers} hidden={cfg.hidden_size} "
        f"heads={cfg.num_attention_heads}/{cfg.num_key_value_heads} head_dim={cfg.head_dim} "
        f"ffn={cfg.intermediate_size} vocab={cfg.vocab_size} rope_theta={cfg.rope_theta:g}"
    )


def weights_hash(params: dict[str, Any], samples: int = 1 << 16) -> str:
    """16 hex digits of a sha256 over every base-model tensor's name, shape and up to
    ``samples`` evenly spaced values rounded to bfloat16 (so fp32 and bf16 loads of one model
    agree; any fine-tune or other model differs). Policy subtrees (lococo, lora) are skipped."""
    import ml_dtypes

    h = hashlib.sha256()
    base = {k: v for k, v in params.items() if k not in ("lococo", "lora")}
    for kp, leaf in sorted(
        jax.tree_util.tree_leaves_with_path(base), key=lambda t: jax.tree_util.keystr(t[0])
    ):
        flat = jnp.ravel(leaf) if isinstance(leaf, jax.Array) else np.ravel(leaf)
        idx = np.linspace(0, flat.size - 1, min(flat.size, samples)).astype(np.int64)
        vals = np.asarray(flat[idx], np.float32).astype(ml_dtypes.bfloat16)
        h.update(f"{jax.tree_util.keystr(kp)}{tuple(leaf.shape)}".encode())
        h.update(vals.tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(cfg: LlamaConfig, params: dict[str, Any]) -> dict[str, str]:
    """{"architecture", "weights"}: what a compressor file is bound to."""
    return {"architecture": architecture(cfg), "weights": weights_hash(params)}


# The embedded SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), which the committed compressor
# files were trained on. Those files predate fingerprints; their meta names model "smollm2".
EMBEDDED_MODEL = {
    "architecture": (
        "llama layers=30 hidden=576 heads=9/3 head_dim=64 ffn=1536 vocab=49152 rope_theta=100000"
    ),
    "weights": "65b108bc154bc7a9",
}
LEGACY_MODELS = {"smollm2": EMBEDDED_MODEL}


def stored_model(path: str | Path) -> dict[str, str] | None:
    """The model fingerprint stored in a compressor file (None for files that predate it)."""
    with safe_open(str(path), framework="numpy") as f:
        md = f.metadata() or {}
    return json.loads(md["model"]) if "model" in md else None


def _describe(model: dict[str, str]) -> str:
    return f"{model['architecture']}, weights {model['weights']}"


def check_binding(
    path: str | Path,
    bound: dict[str, str] | None,
    meta: dict[str, Any],
    cfg: LlamaConfig,
    model: dict[str, str] | None,
) -> None:
    """Raise when the file at path was trained for another model than (cfg, model).

    A file without a fingerprint (older files, the committed ones among them) is bound to the
    model its provenance names when that name is known (LEGACY_MODELS: "smollm2" = the
    embedded model); otherwise only the shapes can be checked, and a note says so."""
    if bound is None:
        name = (meta.get("config") or {}).get("model") if isinstance(meta, dict) else None
        bound = LEGACY_MODELS.get(name) if isinstance(name, str) else None
        if bound is None:
            print(
                f"note: {path} does not record which model it was trained for "
                f"(model {name!r}); only its shapes are checked",
                file=sys.stderr,
            )
            return
    here = {"architecture": architecture(cfg), "weights": (model or {}).get("weights")}
    same_arch = bound.get("architecture") == here["architecture"]
    same_weights = model is None or bound.get("weights") == here["weights"]
    if not (same_arch and same_weights):
        got = here["architecture"] + (f", weights {here['weights']}" if model else "")
        raise ValueError(
            f"{path} was trained for another model ({_describe(bound)}), not this one ({got}); "
            "compressors only work with the base model they were trained for"
        )


def default_compressors(cache_size: int, chunk_size: int = 128) -> Path | None:
    """The committed compressors for the embedded SmolLM2-135M at (M, B), if any."""
    p = ASSETS / f"smollm2-135m_M{cache_size}_B{chunk_size}.safetensors"
    return p if p.is_file() else None


def file_sha256(path: str | Path) -> str:
    """The first 16 hex digits of the file's sha256: names the weights behind a result."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def provenance(policy: str, cache_size: int, chunk_size: int) -> dict[str, str] | None:
    """Which committed weights a result at (policy, M, B) comes from: {"file", "sha256"}; None
    where no weights are involved (other policies, or a random init)."""
    path = default_compressors(cache_size, chunk_size) if policy == "lococo" else None
    return None if path is None else {"file": path.name, "sha256": file_sha256(path)}


def is_current(result: dict[str, Any], chunk_size: int) -> bool:
    """Whether a stored result (with "policy", "cache_size" and the "compressors" provenance it
    was measured with) still describes the committed weights; evaluation scripts redo it if not."""
    now = provenance(result["policy"], result["cache_size"], chunk_size)
    return result.get("compressors") == now


def with_policy_params(
    params: dict[str, Any],
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    path: str | Path | None = None,
) -> tuple[dict[str, Any], CompressionConfig, bool | None]:
    """Attach what the policy needs: for lococo, the compressors at ``path``, else the committed
    ones for (M, B) when this is the model they were trained for (the embedded SmolLM2), else
    an untrained init. -> (params, ccfg, trained: None if the policy has no parameters).

    Trained compressors bring the CompressionConfig they were trained with; M and B must match,
    and they must have been trained for this model (check_binding). A path with a policy that
    has no compressors is an error, as is a path that does not exist.
    """
    if ccfg.policy != "lococo":
        if path is not None:
            raise ValueError(
                f"compressor weights ({path}) were given, but policy {ccfg.policy!r} has no "
                "compressors; use policy 'lococo' or drop them"
            )
        return params, ccfg, None
    model = model_fingerprint(cfg, params)
    if path is None:
        path = default_compressors(ccfg.cache_size, ccfg.chunk_size)
        if path is not None and model != EMBEDDED_MODEL:
            path = None  # trained for the embedded model only
    if path is None:
        from lococo_jax import policies

        sub = policies.init_params(jax.random.PRNGKey(0), cfg, ccfg)
        return dict(params, lococo=sub), ccfg, False
    sub, trained, _ = load_compressors(path, cfg, model)
    if (trained.cache_size, trained.chunk_size) != (ccfg.cache_size, ccfg.chunk_size):
        raise ValueError(
            f"{path} was trained for cache_size={trained.cache_size}, chunk_size="
            f"{trained.chunk_size}, not {ccfg.cache_size}/{ccfg.chunk_size}"
        )
    return dict(params, lococo=sub), trained, True


def resave(src: str | Path, dst: str | Path, conv_dtype: str = "float16") -> Path:
    """Copy a compressor file with its conv weights stored as ``conv_dtype`` (metadata kept;
    provenance notes the storage). How the committed files were made from training exports."""
    params, ccfg, meta = _read(src)
    meta = dict(meta, storage=f"conv weights {conv_dtype}")
    model = stored_model(src)
    return save_compressors(dst, params, ccfg, meta, conv_dtype=conv_dtype, model=model)


def resize(
    src: str | Path, dst: str | Path, cache_size: int, local_len: int, conv_dtype: str = "float32"
) -> Path:
    """Write the compressors of ``src`` for another cache size M', as a warm start for calibrating
    it from a trained M: the same kernels and normaliser, and C' = floor(M' (1 - hh_keep_rate))
    output channels (fused slots) taken from the C trained ones: the first C' when cutting
    (C' <= C), channel floor(j C / C') for new slot j when growing (each trained channel repeated
    C' / C times, side by side). Each output channel is one fused slot's content-based softmax
    over the rest entries (the conv is shared over positions), so any trained channel is a valid
    filter for any slot; slot j's residual anchor (its j-th top-scored rest entry) is what differs.
    One conv layer only (with more, the hidden width C * expand depends on C)."""
    params, ccfg, meta = _read(src)
    new = dataclasses.replace(ccfg, cache_size=cache_size, local_len=local_len)
    if ccfg.n_convlayer != 1:
        raise ValueError(
            f"{src}: n_convlayer={ccfg.n_convlayer}; only a one-layer conv can be resized"
        )
    c, c_new = ccfg.num_fused, new.num_fused
    take = np.arange(c_new) if c_new <= c else np.arange(c_new) * c // c_new
    conv = params["convs"][0]
    params = dict(params, convs=[{"w": conv["w"][..., take], "b": conv["b"][..., take]}])
    src_info = {"file": str(src), "sha256": file_sha256(src), "cache_size": ccfg.cache_size}
    src_info["channels"] = f"first {c_new} of {c}" if c_new <= c else f"floor(j * {c} / {c_new})"
    meta = dict(meta, resized_from=src_info)
    return save_compressors(dst, params, new, meta, conv_dtype=conv_dtype, model=stored_model(src))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description="Re-save a compressor file (e.g. a training export), or resize it to another "
        "cache size (--cache-size, --local-len) as a calibration warm start."
    )
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--conv-dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--cache-size", type=int, help="resize to this M (with --local-len)")
    ap.add_argument("--local-len", type=int, help="the resized file's recent window")
    args = ap.parse_args()
    if (args.cache_size is None) != (args.local_len is None):
        ap.error("--cache-size and --local-len go together")
    if args.cache_size is None:
        print(resave(args.src, args.dst, args.conv_dtype))
    else:
        print(resize(args.src, args.dst, args.cache_size, args.local_len, args.conv_dtype))
