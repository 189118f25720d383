"""The embedded SmolLM2-135M-Instruct (GGUF Q4_1) against transformers' own GGUF loader, fp32.

Converted once per module (lococo_jax.models, cached in a tmp dir); the prompt is the opening of
Pride and Prejudice (tests/data/prideprejudice_opening.txt, public domain).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lococo_jax import convert, llama, models  # noqa: E402
from lococo_jax.tokenizer import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT_FILE = Path(__file__).parent / "data" / "prideprejudice_opening.txt"
PROMPT_TOKENS = 384  # >= 300 real tokens, short enough for 2 CPU cores
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def text() -> str:
    return PROMPT_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ours(smollm2):
    """(cfg, params, tokenizer, cache dir) via the default-model path, converted once."""
    return smollm2


@pytest.fixture(scope="module")
def hf():
    """transformers' model and tokenizer loaded from the same GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.default_gguf_path()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()
    tok = AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )
    return model, tok


@pytest.fixture(scope="module")
def prompt(ours, text) -> np.ndarray:
    ids = ours[2].encode(text, add_special_tokens=False)
    assert len(ids) >= PROMPT_TOKENS
    return np.asarray(ids[:PROMPT_TOKENS], np.int32)[None]


def test_config_is_smollm2(ours):
    cfg = ours[0]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (30, 576, 9)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert cfg.max_position_embeddings == 8192 and cfg.rope_scaling is None


def test_tokenizer_matches_transformers_gguf_tokenizer(ours, hf, text):
    ref = hf[1].encode(text, add_special_tokens=False)
    assert len(ref) >= 300
    # built by load_tokenizer(<the .gguf>) during conversion, saved, reloaded from the dir
    from_dir = ours[2]
    assert from_dir.encode(text, add_special_tokens=False) == ref
    assert load_tokenizer(ours[3]).encode(text, add_special_tokens=False) == ref
    assert from_dir.decode(ref) == text
    assert (from_dir.bos_token_id, from_dir.eos_token_id) == (1, 2)


def test_cache_is_reused(ours, monkeypatch):
    cfg, params, _, cache = ours

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(convert, "convert_and_load", no_conversion)
    cfg2, params2, _ = models.load_default_model(cache_dir=cache, dtype=jnp.bfloat16)
    assert cfg2 == cfg
    assert params2["layers"]["wq"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params2["final_norm"], np.float32),
        np.asarray(params["final_norm"].astype(jnp.bfloat16), np.float32),
    )


@pytest.fixture(scope="module")
def our_logits(ours, prompt) -> np.ndarray:
    """llama.forward on the prompt: [1, T, vocab]."""
    cfg, params = ours[:2]
    llama.check_tokens(prompt, cfg)
    return np.asarray(jax.jit(llama.forward, static_argnums=2)(params, jnp.asarray(prompt), cfg))


@pytest.fixture(scope="module")
def hf_prefill(hf, prompt):
    """transformers' logits on the prompt [1, T, vocab] and its KV cache (reused by generate)."""
    with torch.no_grad():
        out = hf[0](torch.as_tensor(prompt, dtype=torch.long), use_cache=True)
    return out.logits.float().numpy(), out.past_key_values


def test_logits_match_transformers(ours, prompt, our_logits, hf_prefill):
    cfg = ours[0]
    logits, ref = our_logits, hf_prefill[0]
    assert logits.shape == ref.shape == (1, PROMPT_TOKENS, cfg.vocab_size)
    diff = np.abs(logits - ref).max()
    assert diff <= 2e-3, f"max abs logit diff {diff}"
    # A real language model on real English: low perplexity on a famous opening.
    logp = jax.nn.log_softmax(jnp.asarray(logits[0, :-1]), axis=-1)
    nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(prompt[0, 1:, None]), axis=-1)).mean()
    assert np.exp(nll) < 40.0, f"perplexity {np.exp(nll)}"


def _greedy(params, cfg, prompt: np.ndarray, n_new: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding with a fixed-size KV cache built from llama.py's layer pieces: one prefill
    program and one single-token program (a full forward per new token is too slow on CPU).

    prompt: [1, T]. Returns the new token ids and the prefill's last logits [vocab].
    """
    L, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    total = prompt.shape[1] + n_new
    cache0 = jnp.zeros((L, 1, total, kv, hd), jnp.float32)

    @jax.jit
    def step(params, ck, cv, tokens, start):
        # tokens [1, t] at positions start..start+t-1; ck, cv [L, 1, total, kv, hd]
        t = tokens.shape[1]
        positions = start + jnp.arange(t, dtype=jnp.int32)[None]
        mask = (jnp.arange(total)[None, :] <= positions[0][:, None])[None]  # [1, t, total]

        def layer(x, xs):
            lp, k_l, v_l = xs
            q, k, v = llama.qkv(cfg, lp, x, positions)
            k_l = jax.lax.dynamic_update_slice(k_l, k, (0, start, 0, 0))
            v_l = jax.lax.dynamic_update_slice(v_l, v, (0, start, 0, 0))
            out, _ = llama.attend(cfg, q, k_l, v_l, mask)
            return llama.attn_out_and_mlp(cfg, lp, x, out), (k_l, v_l)

        x, (ck, cv) = jax.lax.scan(layer, llama.embed(params, tokens), (params["layers"], ck, cv))
        return llama.lm_head(cfg, params, x[:, -1:])[:, 0], ck, cv

    logits, ck, cv = step(params, cache0, cache0, jnp.asarray(prompt), jnp.int32(0))
    first_logits = np.asarray(logits[0])
    out = []
    pos = prompt.shape[1]
    for _ in range(n_new):
        nxt = int(jnp.argmax(logits[0]))
        out.append(nxt)
        tok = jnp.full((1, 1), nxt, jnp.int32)
        logits, ck, cv = step(params, ck, cv, tok, jnp.int32(pos))
        pos += 1
    return out, first_logits


def test_greedy_matches_transformers_generate(ours, hf, prompt, our_logits, hf_prefill):
    cfg, params, tok = ours[:3]
    new, last_logits = _greedy(params, cfg, prompt, NEW_TOKENS)
    # the cached prefill agrees with the full forward
    np.testing.assert_allclose(last_logits, our_logits[0, -1], rtol=0, atol=1e-3)

    ids = torch.as_tensor(prompt, dtype=torch.long)
    # generate() continues from the prefill's cache minus its last token (saves a second prefill
    # on CPU; it then reprocesses only the last prompt token and decodes greedily as usual)
    cache = hf_prefill[1]
    cache.crop(-1)
    with torch.no_grad():
        ref = hf[0].generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
    ref_new = ref[0, prompt.shape[1] :].tolist()
    assert len(ref_new) >= 1
    assert new[: len(ref_new)] == ref_new, (tok.decode(new), tok.decode(ref_new))
    if len(ref_new) < NEW_TOKENS:  # transformers stopped at EOS
        assert ref_new[-1] == cfg.eos_token_id
