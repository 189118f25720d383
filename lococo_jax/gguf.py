"""llama.cpp GGUF files -> (LlamaConfig, params): metadata to config, dequantisation, and the
q/k row un-permutation (llama.cpp interleaves RoPE pairs; we keep Hugging Face's split halves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lococo_jax.config import ConfigError, LlamaConfig, RopeScaling
from lococo_jax.convert import CheckpointFormatError, Params, _assemble, _TensorSource

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
    import gguf  # the pip package (absolute import), not this module

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
