"""Evaluation: perplexity of a long text and passkey retrieval, through the compressed cache."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lococo_jax import generate, longctx
from lococo_jax.config import CompressionConfig, LlamaConfig


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    n_tokens: int  # tokens scored (length - 1)
    nll: float  # mean negative log-likelihood, nats
    seconds: float

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))

    @property
    def tokens_per_s(self) -> float:
        return (self.n_tokens + 1) / max(self.seconds, 1e-9)


def nll_per_token(
    params: dict[str, Any],
    tokens: np.ndarray,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    *,
    segment_chunks: int = 8,
    progress: bool = False,
    desc: str = "reading",
) -> np.ndarray:
    """Read tokens [L] once, front to back; -> NLL [L - 1] of each next token (nats)."""
    tokens = np.asarray(tokens).reshape(1, -1)
    with tqdm(total=tokens.size, desc=desc, unit="tok", disable=not progress) as bar:
        res = longctx.run_long(
            params, tokens, cfg, ccfg, output="nll", segment_chunks=segment_chunks, progress=bar
        )
    return res.out[0, :-1]


def prefix_perplexities(nll: np.ndarray, lengths: list[int]) -> dict[str, float]:
    """nll [L - 1] (nll_per_token) -> {str(n): perplexity of the first n tokens} for each n in
    ``lengths`` (n <= L): one causal read gives every prefix."""
    csum = np.cumsum(nll)
    return {str(n): float(np.exp(csum[n - 2] / (n - 1))) for n in lengths}


def perplexity(
    params: dict[str, Any],
    tokens: np.ndarray,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    *,
    segment_chunks: int = 8,
    progress: bool = False,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of tokens [L] read through the cache (L >= 2: the first token is not scored)."""
    if np.asarray(tokens).size < 2:
        raise ValueError(
            f"perplexity needs at least 2 tokens (the first one is not scored), got "
            f"{np.asarray(tokens).size}"
        )
    t0 = time.perf_counter()
    nll = nll_per_token(
        params, tokens, cfg, ccfg, segment_chunks=segment_chunks, progress=progress, desc=desc
    )
    return PerplexityResult(len(nll), float(nll.mean()), time.perf_counter() - t0)


FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def passkey_prompt(
    tokenizer: Any, length: int, depth: float, passkey: str
) -> tuple[np.ndarray, str]:
    """A prompt of about ``length`` tokens: filler with the passkey sentence at relative
    ``depth`` in [0, 1], ending with the question. Returns (token ids [L], answer)."""
    head = "There is an important piece of information hidden inside a lot of irrelevant text. "
    head += "Find it and memorize it. I will quiz you about it.\n"
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    budget = length - len(enc(head)) - len(enc(needle)) - len(enc(tail))
    if budget <= 0:
        raise ValueError(f"passkey prompt length {length} is too short for the question")
    filler_ids = enc(FILLER)
    filler = (filler_ids * (budget // len(filler_ids) + 1))[:budget]
    cut = int(round(depth * budget))
    ids = enc(head) + filler[:cut] + enc(needle) + filler[cut:] + enc(tail)
    return np.asarray(ids, np.int32), passkey


def passkey_accuracy(
    params: dict[str, Any],
    tokenizer: Any,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    *,
    length: int,
    trials: int,
    seed: int = 0,
    batch_size: int = 10,
    max_new_tokens: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy-decode the answer for ``trials`` prompts (random 5-digit keys and depths), in
    batches of ragged rows; a trial passes when its key appears in the generated text."""
    rng = np.random.RandomState(seed)
    keys = [str(rng.randint(10000, 100000)) for _ in range(trials)]
    depths = [float(d) for d in rng.uniform(0.0, 1.0, trials)]
    prompts = [
        passkey_prompt(tokenizer, length, d, k)[0] for k, d in zip(keys, depths, strict=True)
    ]
    hits: list[bool] = []
    for start in tqdm(range(0, trials, batch_size), desc=f"passkey {length}", disable=not progress):
        rows = prompts[start : start + batch_size]
        lengths = np.array([len(r) for r in rows])
        batch = np.zeros((len(rows), lengths.max()), np.int32)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = r
        out = generate.generate(
            params,
            batch,
            cfg,
            ccfg,
            generate.SamplingConfig(max_new_tokens=max_new_tokens),
            lengths=lengths,
        )
        for i, toks in enumerate(out.tokens):
            hits.append(keys[start + i] in tokenizer.decode(toks.tolist()))
    return {
        "accuracy": float(np.mean(hits)),
        "trials": trials,
        "hits": hits,
        "depths": depths,
    }
