"""Command line: ``python -m lococo_jax {demo,generate,perplexity,convert} ...``.

--model is ``smollm2`` (the embedded default, converted once and cached), a converted
checkpoint dir, a Hugging Face Llama folder, or a .gguf file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lococo_jax import compressors, evaluate, generate, policies
from lococo_jax.config import CompressionConfig, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO / "data" / "austen" / "persuasion.txt"


def load_model(spec: str, dtype=jnp.float32) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """-> (config, params, tokenizer) for any --model spec (models.load_model)."""
    from lococo_jax import models

    return models.load_model(spec, dtype=dtype)


def compression_from_args(args: argparse.Namespace, cfg: LlamaConfig, params: dict) -> tuple:
    """-> (CompressionConfig, params with the policy's subtree)."""
    ccfg = CompressionConfig(
        policy=args.policy, cache_size=args.cache_size, chunk_size=args.chunk_size
    )
    params, ccfg, trained = compressors.with_policy_params(params, cfg, ccfg, args.compressors)
    if trained is False:
        print(
            f"note: no trained compressors for M={args.cache_size} B={args.chunk_size}; "
            "using randomly initialised ones (pass --compressors PATH)",
            file=sys.stderr,
        )
    return ccfg, params


def _encode(tok, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text, add_special_tokens=False), np.int32)


def cmd_convert(args: argparse.Namespace) -> None:
    from lococo_jax import convert

    out = convert.convert(args.src, args.dst)
    print(f"converted {args.src} -> {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    cfg, params, tok = load_model(args.model)
    ccfg, params = compression_from_args(args, cfg, params)
    text = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    ids = _encode(tok, text)
    if args.policy == "full":
        ccfg = dataclasses.replace(ccfg, cache_size=len(ids) + args.max_new_tokens)
    sampling = generate.SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    out = generate.generate(
        params, ids[None], cfg, ccfg, sampling, eos_id=cfg.eos_token_id, progress=True
    )
    print(tok.decode(out.tokens[0].tolist()))
    print(
        f"\n[{args.policy} M={ccfg.cache_size} B={ccfg.chunk_size}] prompt {len(ids)} tokens in "
        f"{out.prefill_seconds:.1f}s ({len(ids) / out.prefill_seconds:.1f} tok/s); "
        f"{out.tokens.shape[1]} new tokens at {out.decode_tokens_per_s:.1f} tok/s",
        file=sys.stderr,
    )


def cmd_perplexity(args: argparse.Namespace) -> None:
    cfg, params, tok = load_model(args.model)
    if args.rope_linear != 1.0:
        cfg = cfg.with_linear_rope_scaling(args.rope_linear)
    ccfg, params = compression_from_args(args, cfg, params)
    ids = _encode(tok, Path(args.text_file).read_text(encoding="utf-8"))[: args.max_tokens]
    if args.policy == "full":
        ccfg = dataclasses.replace(ccfg, cache_size=len(ids))
    res = evaluate.perplexity(params, ids, cfg, ccfg, progress=True)
    row = {
        "policy": args.policy,
        "cache_size": ccfg.cache_size,
        "chunk_size": ccfg.chunk_size,
        "tokens": len(ids),
        "perplexity": res.perplexity,
        "tokens_per_s": res.tokens_per_s,
    }
    print(json.dumps(row))


def _kv_mb(cfg: LlamaConfig, slots: int, window: int, bytes_per: int = 4) -> float:
    per = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * bytes_per
    return per * (slots + window) / 2**20


def cmd_demo(args: argparse.Namespace) -> None:
    """Read a long held-out document through a fixed M-slot cache and through full attention;
    print memory, speed and perplexity side by side, then continue the document with each."""
    cfg, params, tok = load_model(args.model)
    ids = _encode(tok, Path(args.doc).read_text(encoding="utf-8"))[: args.tokens]
    print(
        f"Document: {Path(args.doc).name}, first {len(ids)} tokens (held out from calibration); "
        f"model: {args.model} ({cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads)"
    )
    runs = []
    for policy in ("full", "lococo"):
        ns = argparse.Namespace(**vars(args), policy=policy)
        ccfg, p = compression_from_args(ns, cfg, params)
        if policy == "full":
            ccfg = dataclasses.replace(ccfg, cache_size=len(ids) + args.max_new_tokens)
        t0 = time.perf_counter()
        ppl = evaluate.perplexity(p, ids, cfg, ccfg, progress=True, desc=f"{policy} read")
        gen = generate.generate(
            p,
            ids[None],
            cfg,
            ccfg,
            generate.SamplingConfig(args.max_new_tokens),
            progress=False,
        )
        runs.append(
            dict(
                policy=policy,
                slots=ccfg.cache_size,
                kv_mb=_kv_mb(cfg, ccfg.cache_size, ccfg.chunk_size),
                read_tok_s=ppl.tokens_per_s,
                decode_tok_s=gen.decode_tokens_per_s,
                ppl=ppl.perplexity,
                text=tok.decode(gen.tokens[0].tolist()),
                seconds=time.perf_counter() - t0,
            )
        )
    print(f"\n{'':<22}" + "".join(f"{r['policy']:>16}" for r in runs))
    fields = [
        ("KV cache slots/layer", "slots", "{:>16d}"),
        ("KV cache MB (fp32)", "kv_mb", "{:>16.1f}"),
        ("read tokens/s", "read_tok_s", "{:>16.1f}"),
        ("decode tokens/s", "decode_tok_s", "{:>16.1f}"),
        ("perplexity", "ppl", "{:>16.2f}"),
        ("wall seconds", "seconds", "{:>16.1f}"),
    ]
    for label, key, fmt in fields:
        print(f"{label:<22}" + "".join(fmt.format(r[key]) for r in runs))
    for r in runs:
        print(f"\n--- continuation with {r['policy']} ---\n{r['text'].strip()}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lococo_jax", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def model_args(p: argparse.ArgumentParser, policy: bool = True) -> None:
        p.add_argument(
            "--model", default="smollm2", help="smollm2 | converted dir | HF dir | .gguf"
        )
        p.add_argument("--cache-size", type=int, default=128, help="M slots per layer")
        p.add_argument("--chunk-size", type=int, default=128, help="B tokens per chunk")
        p.add_argument("--compressors", default=None, help="lococo weights (.safetensors)")
        if policy:
            p.add_argument("--policy", default="lococo", choices=sorted(policies.REGISTRY))

    p = sub.add_parser("convert", help="HF folder or .gguf -> converted (orbax) checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("generate", help="continue a (long) prompt with a fixed-size cache")
    model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("perplexity", help="perplexity of a text file read through the cache")
    model_args(p)
    p.add_argument("--text-file", required=True)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--rope-linear", type=float, default=1.0, help="linear RoPE scaling factor")
    p.set_defaults(fn=cmd_perplexity)

    p = sub.add_parser("demo", help="the long-context demo on the embedded default model")
    model_args(p, policy=False)
    p.add_argument("--doc", default=str(DEFAULT_DOC))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.fn(args)
