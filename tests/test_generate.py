"""Decoding as a device loop (generate.decode_block) against the per-token host loop it
replaced, kept here as the oracle: same tokens, same final state, eos per row, streaming."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lococo_jax import generate, longctx, policies
from lococo_jax.compile_log import CompileLog
from lococo_jax.config import CompressionConfig

PROMPT_LENGTHS = np.array([13, 9])  # ragged rows: each row's window fills at its own step


def _params(params, cfg, ccfg):
    sub = policies.init_params(jax.random.PRNGKey(1), cfg, ccfg)
    return params if sub is None else dict(params, lococo=sub)


def per_token_generate(params, prompt, cfg, ccfg, sampling, lengths, eos_id=None):
    """The former generate loop: one decode_step per token, every token read on the host.
    -> (tokens [b, n], final state)."""
    res = longctx.run_long(params, prompt, cfg, ccfg, lengths=lengths, output="last")
    key, sub = jax.random.split(jax.random.PRNGKey(sampling.seed))
    token = generate.sample(res.last_logits, sub, sampling.temperature, sampling.top_p)
    state, out = res.state, []
    done = np.zeros(prompt.shape[0], bool)
    while True:
        out.append(np.asarray(token))
        if eos_id is not None:
            done |= out[-1] == eos_id
        if done.all() or len(out) == sampling.max_new_tokens:
            return np.stack(out, axis=1), state
        key, sub = jax.random.split(key)
        token, _, state = generate.decode_step(
            params, state, token, sub, cfg, ccfg, sampling.temperature, sampling.top_p
        )


def _prompt(cfg):
    prompt = np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 13))
    prompt[1, 9:] = 0
    return prompt


CASES = {
    # full keeps every token; lococo compresses in the prefill and again at every window flush.
    "full": CompressionConfig(policy="full", cache_size=48, chunk_size=8),
    "lococo": CompressionConfig(policy="lococo", cache_size=16, chunk_size=8, kernel_size=3),
}


# Block 7 against windows of 8: blocks end off the window flushes.
@pytest.mark.parametrize("policy, block", [("full", 8), ("lococo", 7)])
def test_greedy_equals_per_token_loop(tiny_cfg, tiny_params, policy, block):
    ccfg = CASES[policy]
    params = _params(tiny_params, tiny_cfg, ccfg)
    prompt, sampling = _prompt(tiny_cfg), generate.SamplingConfig(max_new_tokens=30)
    ref, ref_state = per_token_generate(params, prompt, tiny_cfg, ccfg, sampling, PROMPT_LENGTHS)
    got = generate.generate(
        params, prompt, tiny_cfg, ccfg, sampling, lengths=PROMPT_LENGTHS, block=block
    )
    assert got.tokens.shape == (2, 30) and got.tokens.dtype == np.int32
    np.testing.assert_array_equal(got.tokens, ref)
    np.testing.assert_array_equal(np.asarray(got.state.seen), PROMPT_LENGTHS + 29)
    for name in ("seen", "filled", "win_valid", "win_len", "pos"):
        np.testing.assert_array_equal(getattr(got.state, name), getattr(ref_state, name), name)
    np.testing.assert_allclose(got.state.k, ref_state.k, atol=1e-5)


def test_sampling_draws_the_same_keys_as_per_token_loop(tiny_cfg, tiny_params):
    ccfg = CASES["lococo"]
    params = _params(tiny_params, tiny_cfg, ccfg)
    sampling = generate.SamplingConfig(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=5)
    prompt = _prompt(tiny_cfg)
    ref, _ = per_token_generate(params, prompt, tiny_cfg, ccfg, sampling, PROMPT_LENGTHS)
    got = generate.generate(
        params, prompt, tiny_cfg, ccfg, sampling, lengths=PROMPT_LENGTHS, block=8
    )
    np.testing.assert_array_equal(got.tokens, ref)
    assert len(set(ref[0].tolist())) > 3  # really sampled, not one repeated token


def test_eos_stops_each_row_then_all(tiny_cfg, tiny_params):
    ccfg = CASES["lococo"]
    params = _params(tiny_params, tiny_cfg, ccfg)
    prompt, sampling = _prompt(tiny_cfg), generate.SamplingConfig(max_new_tokens=30)
    free, _ = per_token_generate(params, prompt, tiny_cfg, ccfg, sampling, PROMPT_LENGTHS)
    # An eos that both rows produce, at different steps, not before the second block.
    first = {
        t: [list(r).index(t) for r in free] for t in set(free[0]) & set(free[1]) if t != free[0, 0]
    }
    eos = max(first, key=lambda t: max(first[t]))
    stop = max(first[eos])
    assert 8 < stop < 29 and min(first[eos]) < stop, first[eos]
    ref, ref_state = per_token_generate(
        params, prompt, tiny_cfg, ccfg, sampling, PROMPT_LENGTHS, eos_id=eos
    )
    assert ref.shape == (2, stop + 1)
    for block in (7, 5):
        got = generate.generate(
            params,
            prompt,
            tiny_cfg,
            ccfg,
            sampling,
            lengths=PROMPT_LENGTHS,
            eos_id=eos,
            block=block,
        )
        np.testing.assert_array_equal(got.tokens, ref)
        # The last token (every row done) is not fed back, as before.
        np.testing.assert_array_equal(got.state.seen, PROMPT_LENGTHS + stop)
        np.testing.assert_array_equal(got.state.seen, ref_state.seen)


def test_eos_on_the_first_token(tiny_cfg, tiny_params):
    ccfg = CASES["full"]
    prompt = _prompt(tiny_cfg)
    prompt[1] = prompt[0]  # both rows start with the same token
    sampling, lengths = generate.SamplingConfig(max_new_tokens=30), np.array([13, 13])
    free = generate.generate(
        tiny_params, prompt, tiny_cfg, ccfg, sampling, lengths=lengths, block=8
    )
    eos = int(free.tokens[0, 0])
    got = generate.generate(
        tiny_params, prompt, tiny_cfg, ccfg, sampling, lengths=lengths, eos_id=eos, block=8
    )
    np.testing.assert_array_equal(got.tokens, [[eos], [eos]])
    np.testing.assert_array_equal(got.state.seen, lengths)


def test_one_compile_per_batch_and_block(tiny_cfg, tiny_params):
    ccfg = CASES["lococo"]
    # Committed to a device, as load_model's parameters are: the first block's carry must be
    # placed like the later ones (decode_block outputs), or XLA compiles the block twice.
    params = jax.device_put(_params(tiny_params, tiny_cfg, ccfg), jax.devices()[0])
    prompt, sizes = _prompt(tiny_cfg), []
    with CompileLog() as log:
        for n in (30, 3, 17, 41):
            out = generate.generate(
                params,
                prompt,
                tiny_cfg,
                ccfg,
                generate.SamplingConfig(max_new_tokens=n),
                lengths=PROMPT_LENGTHS,
                eos_id=None if n == 30 else n,  # eos is traced too
                block=7,
            )
            sizes.append(generate.decode_block._cache_size())
            assert 1 <= out.tokens.shape[1] <= n
    assert sizes[1:] == sizes[:1] * 3  # every total length reuses the first call's program
    assert len(log.names("decode_block")) == 1, log.compiles


def test_streams_block_by_block(monkeypatch, tiny_cfg, tiny_params):
    """on_token sees every token in order; block k's tokens are handed out while block k + 1
    runs (it is launched first), so an interrupted run keeps all but the running blocks."""
    got, at_launch = [], []
    real = generate.decode_block

    def launch(*a, **k):
        at_launch.append(len(got))
        return real(*a, **k)

    monkeypatch.setattr(generate, "decode_block", launch)
    out = generate.generate(
        tiny_params,
        _prompt(tiny_cfg),
        tiny_cfg,
        CASES["full"],
        generate.SamplingConfig(max_new_tokens=20),
        on_token=lambda ids: got.append(int(ids[0])),
        block=8,
    )
    assert got == out.tokens[0].tolist() and out.tokens.shape == (2, 20)
    # 1 token from the prompt's logits, then blocks of 8, 8 and 3.
    assert at_launch == [0, 1, 9]


def test_bad_block_raises(tiny_cfg, tiny_params):
    with pytest.raises(ValueError, match="block"):
        generate.generate(tiny_params, _prompt(tiny_cfg), tiny_cfg, CASES["full"], block=0)
