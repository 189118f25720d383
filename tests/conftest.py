"""Shared fixtures: a tiny random Llama (GQA) that every core test can build in milliseconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from lococo_jax import llama  # noqa: E402
from lococo_jax.config import LlamaConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=256,
    )


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    # std 0.1: logits of order 1, attention far from uniform.
    return llama.init_params(tiny_cfg, jax.random.PRNGKey(0), jnp.float32, std=0.1)


@pytest.fixture(scope="session")
def peaky_params(tiny_cfg):
    # Peaked attention, so policy choices are decided by clear score gaps, not float noise.
    return llama.init_params(tiny_cfg, jax.random.PRNGKey(0), jnp.float32, std=0.3)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct: (cfg, params, tokenizer, cache dir), converted from
    its GGUF once per session into a temporary cache (never the user's)."""
    from lococo_jax import models

    cache = tmp_path_factory.mktemp("lococo_cache") / "smollm2"
    cfg, params, tok = models.load_default_model(cache_dir=cache)
    return cfg, params, tok, cache


def make_tiny_hf(folder, edit=None, **config):
    """A tiny random transformers LlamaForCausalLM with a character-level tokenizer (printable
    ASCII, vocab 128) saved as a Hugging Face folder; ``config`` overrides LlamaConfig fields and
    ``edit(model)`` may change the torch model before it is saved. Returns the folder."""
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(
        folder
    )
    torch.manual_seed(0)
    kw = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, **config}))
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    return folder


def torch_llama(cfg, params):
    """transformers' LlamaForCausalLM (eval mode) holding our ``params`` for ``cfg``: the
    reference our forward passes are compared with. Every weight must load (only the rotary
    buffers, and a tied lm_head, are transformers' own)."""
    import numpy as np
    import torch
    import transformers

    from lococo_jax.train.export import hf_state_dict

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**cfg.to_hf_config(for_transformers=True))
    ).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf_state_dict(cfg, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or "lm_head" in m for m in missing)
    return model


AUSTEN_SAMPLE = os.path.join(os.path.dirname(__file__), "data", "austen_sample.txt")


def tiny_run_fields(tmp_path, **kw) -> dict:
    """TrainConfig fields of a fast run on the tiny model (byte tokenizer) over real text."""
    base = dict(
        data_files=[AUSTEN_SAMPLE],
        data_dir=str(tmp_path / "tfds"),
        batch_size=4,
        clean_period=4,
        steps=6,
        lr=1e-3,
        memory_lr_scale=10.0,
        progress=False,
        mesh_data=1,
    )
    return {**base, **kw}
