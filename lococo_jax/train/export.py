"""What a finished run hands on.

- ``export_compressors``: the trained compressors alone (safetensors, small, shareable) with
  the CompressionConfig and the fingerprint of the model they were trained beside.
- ``export_model``: the merged model (base + trained embeddings/norms + LoRA folded in) as a
  converted checkpoint directory (orbax params + config.json with the RoPE scaling used in
  training + the tokenizer), which every CLI command's ``--model`` loads.
- ``export_hf``: the merged model as a Hugging Face folder (config.json + model.safetensors +
  tokenizer) that transformers' LlamaForCausalLM loads, as Levanter's export_lm_to_hf does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lococo_jax import compressors, convert, lora
from lococo_jax.config import LlamaConfig
from lococo_jax.train import state as train_state

Params = dict[str, Any]


def merged_params(base: Params, trainable: Params, lora_scale: float) -> Params:
    """The model a run trained: base with the trained leaves (in the base's dtype) and LoRA
    folded into the projections; no ``lococo`` or ``lora`` subtree."""
    merged = lora.merge_lora(train_state.merge(base, trainable), lora_scale)
    return {k: v for k, v in merged.items() if k != "lococo"}


def export_compressors(
    path: str | Path,
    trainable: Params,
    ccfg: Any,
    meta: dict[str, Any] | None = None,
    model: dict[str, str] | None = None,
) -> Path:
    """trainable["lococo"] as a compressor file bound to ``model`` (a
    compressors.model_fingerprint; see compressors.save_compressors)."""
    lococo = jax.device_get(trainable["lococo"])
    return compressors.save_compressors(path, lococo, ccfg, meta, model=model)


def _save_tokenizer(tokenizer: Any, dst: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(dst))


def _atomic_dir(dst: str | Path, write) -> Path:
    """write(tmp) into a fresh sibling of dst, then rename it over dst (replacing an old
    export); nothing is left behind on failure. (A Hugging Face folder is not a converted
    checkpoint, so convert's own atomic writer, which only replaces those, does not serve.)"""
    dst = Path(dst).expanduser().resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def export_model(dst: str | Path, cfg: LlamaConfig, params: Params, tokenizer: Any) -> Path:
    """A converted checkpoint directory (convert.save_params, tokenizer included) of ``params``
    with ``cfg`` (its rope_scaling included), replacing an earlier export: ``--model dst``
    loads it."""
    return convert.save_params(params, cfg, dst, overwrite=True, tokenizer=tokenizer)


def hf_state_dict(cfg: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
    """Our params as transformers' LlamaForCausalLM state dict (numpy, [out, in] weights)."""
    out = {
        "model.embed_tokens.weight": params["embed"],
        "model.norm.weight": params["final_norm"],
    }
    if "lm_head" in params:
        out["lm_head.weight"] = params["lm_head"].T
    for name, arr in params["layers"].items():
        hf_name, transposed = convert.HF_LAYER_NAMES[name]
        for i in range(cfg.num_hidden_layers):
            a = arr[i]
            out[f"model.layers.{i}.{hf_name}"] = a.T if transposed else a
    return {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in out.items()}


def export_hf(dst: str | Path, cfg: LlamaConfig, params: Params, tokenizer: Any) -> Path:
    """A Hugging Face Llama folder: config.json (transformers' keys; a RoPE scaling that
    transformers cannot express is an error) + model.safetensors (the params' dtype) +
    the tokenizer."""
    from safetensors.flax import save_file

    hf_cfg = cfg.to_hf_config(for_transformers=True)
    tensors = hf_state_dict(cfg, params)

    def write(tmp: Path) -> None:
        save_file(
            {k: jax.numpy.asarray(v) for k, v in tensors.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        dtype = str(params["embed"].dtype)
        hf_cfg["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16"}.get(dtype, dtype)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        _save_tokenizer(tokenizer, tmp)

    return _atomic_dir(dst, write)
