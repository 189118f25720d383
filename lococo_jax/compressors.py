"""Trained LoCoCo compressor weights alone (params["lococo"]): small, shareable files.

Format: one safetensors file with flat keys ``convs.{i}.w`` [L, k, in, out], ``convs.{i}.b``
[L, out], ``normalizer`` [L], and metadata holding the CompressionConfig (JSON) and free-form
provenance (model, command, data split). safetensors rather than orbax because the file is
meant to be committed, diffed by size, and read without a checkpoint directory layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
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
) -> Path:
    """Write params (the lococo subtree) atomically: a temp file renamed into place. A URL
    (gs://...) is written through etils.epath (object stores write whole objects anyway).

    conv_dtype "float16" halves the file (the committed M=128 weights: 20.6 -> 10.3 MB); the
    conv weights are ~N(0, 1), well inside float16's range. Loading gives float32 either way.
    """
    if conv_dtype not in ("float32", "float16"):
        raise ValueError(f"conv_dtype must be float32 or float16, got {conv_dtype!r}")
    tensors = {"normalizer": np.asarray(params["normalizer"], np.float32)}
    for i, conv in enumerate(params["convs"]):
        tensors[f"convs.{i}.w"] = np.asarray(conv["w"], np.float32).astype(conv_dtype)
        tensors[f"convs.{i}.b"] = np.asarray(conv["b"], np.float32)
    metadata = {
        "compression_config": json.dumps(dataclasses.asdict(ccfg)),
        "meta": json.dumps(meta or {}),
    }
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


def load_compressors(
    path: str | Path, cfg: LlamaConfig
) -> tuple[dict[str, Any], CompressionConfig, dict[str, Any]]:
    """-> (lococo params (float32), the CompressionConfig they were trained with, provenance)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressor weights not found: {path}")
    stored, ccfg, meta = _read(path)
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
        "convs": [
            {"w": tensors[f"convs.{i}.w"], "b": tensors[f"convs.{i}.b"]}
            for i in range(ccfg.n_convlayer)
        ],
        "normalizer": tensors["normalizer"],
    }
    return params, ccfg, json.loads(md.get("meta", "{}"))


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
    ones for (M, B) if any, else a random init. -> (params, ccfg, trained: None if no params).

    Trained compressors bring the CompressionConfig they were trained with; M and B must match.
    """
    if ccfg.policy != "lococo":
        return params, ccfg, None
    path = path or default_compressors(ccfg.cache_size, ccfg.chunk_size)
    if path is None:
        from lococo_jax import policies

        sub = policies.init_params(jax.random.PRNGKey(0), cfg, ccfg)
        return dict(params, lococo=sub), ccfg, False
    sub, trained, _ = load_compressors(path, cfg)
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
    return save_compressors(dst, params, ccfg, meta, conv_dtype=conv_dtype)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Re-save a compressor file (e.g. a training export).")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--conv-dtype", default="float16", choices=["float16", "float32"])
    args = ap.parse_args()
    print(resave(args.src, args.dst, args.conv_dtype))
