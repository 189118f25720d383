"""Command line: ``python -m lococo_jax {demo,generate,perplexity,convert} ...``.

--model is ``smollm2`` (the embedded default, converted once and cached), ``tiny`` (a random
2-layer model with a byte tokenizer), a converted checkpoint dir, a Hugging Face Llama folder,
or a .gguf file.

Every argument and input file is checked before the model loads; a user error prints one
line (``error: ...``) and exits with status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lococo_jax import compressors, evaluate, generate, policies
from lococo_jax.config import CompressionConfig, ConfigError, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO / "data" / "austen" / "persuasion.txt"
BUILTIN_MODELS = ("smollm2", "tiny")
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A bad argument, input file or result: reported as one line, exit status 2."""


def load_model(spec: str, dtype=jnp.float32) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """-> (config, params, tokenizer) for any --model spec (models.load_model)."""
    from lococo_jax import models

    return models.load_model(spec, dtype=dtype)


# ------------------------------------------------------------------ checks before loading


def check_model_spec(spec: str) -> None:
    if spec in BUILTIN_MODELS:
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"--model {spec!r}: no such file or directory (use {' or '.join(BUILTIN_MODELS)}, "
            "a converted checkpoint, a Hugging Face Llama folder or a .gguf file)"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise UserError(f"--model {spec!r}: a model file must be a .gguf; otherwise pass a folder")


def read_text(path: str, flag: str) -> str:
    """The UTF-8 text of an input file, or a UserError naming the file and the problem."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag} {path}: no such file")
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a directory, not a text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot be read ({e.strerror})") from None
    if not data.strip():
        raise UserError(f"{flag} {path}: is empty")
    if b"\0" in data[:65536]:
        raise UserError(f"{flag} {path}: is a binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{flag} {path}: is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset "
            f"{e.start})"
        ) from None


def positive(flag: str, value: int | float, minimum: int | float = 1) -> None:
    if value < minimum:
        raise UserError(f"{flag} must be >= {minimum}, got {value}")


def compression_config(args: argparse.Namespace, policy: str) -> CompressionConfig:
    """The CompressionConfig the flags ask for (its own checks name the bad field)."""
    if args.compressors is not None:
        if policy != "lococo":
            raise UserError(
                f"--compressors {args.compressors}: policy {policy!r} has no compressors; use "
                "--policy lococo or drop --compressors"
            )
        if not Path(args.compressors).expanduser().is_file():
            raise UserError(f"--compressors {args.compressors}: no such file")
    return CompressionConfig(policy=policy, cache_size=args.cache_size, chunk_size=args.chunk_size)


# ------------------------------------------------------------------ checks after loading


def position_limit(cfg: LlamaConfig) -> int:
    """The positions the model was trained for, times a linear RoPE scaling that extends them."""
    s = cfg.rope_scaling
    if s is None:
        return cfg.max_position_embeddings
    factor = s.factor if s.rope_type == "linear" else s.linear_factor
    return int(cfg.max_position_embeddings * factor)


def check_positions(cfg: LlamaConfig, total: int, what: str, allow: bool) -> None:
    limit = position_limit(cfg)
    if total <= limit:
        return
    msg = (
        f"{what} needs {total} positions, past the model's {limit} "
        f"(max_position_embeddings={cfg.max_position_embeddings}"
        + (f", RoPE scaling {cfg.rope_scaling.rope_type}" if cfg.rope_scaling else "")
        + ")"
    )
    if not allow:
        raise UserError(f"{msg}; lower it, or pass --past-positions to run anyway")
    print(f"warning: {msg}; quality degrades past them", file=sys.stderr)


def kv_cache_bytes(cfg: LlamaConfig, slots: int, window: int, dtype_bytes: int = 4) -> int:
    """Bytes of one row's KV state (kv_state.KVState): keys and values, positions and scores."""
    per_entry = cfg.num_key_value_heads * (2 * cfg.head_dim * dtype_bytes + 12) + 4
    return cfg.num_hidden_layers * per_entry * (slots + window)


def available_memory() -> tuple[int, str]:
    """(free bytes, where) on the default device: its allocator's limit if it reports one,
    else the host's available RAM (psutil)."""
    import jax
    import psutil

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"{dev.platform} memory"
    return int(psutil.virtual_memory().available), "available RAM"


def check_full_fits(cfg: LlamaConfig, ccfg: CompressionConfig) -> None:
    need = kv_cache_bytes(cfg, ccfg.cache_size, ccfg.chunk_size)
    free, where = available_memory()
    if need > free:
        raise UserError(
            f"policy 'full' keeps all {ccfg.cache_size} tokens: its KV cache needs "
            f"{need / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB of {where} is free; pick a "
            "compressing policy or fewer tokens"
        )


def warn_if_uncompressed(ccfg: CompressionConfig, n: int, reading: bool) -> None:
    """Say so when compression cannot change the result: n tokens fit in the cache, or (when
    reading a text) in the first chunk, whose queries all see the uncompressed history."""
    fits = max(ccfg.cache_size, ccfg.chunk_size) if reading else ccfg.cache_size
    if ccfg.policy != "full" and n <= fits:
        which = "cache" if n <= ccfg.cache_size else "first chunk"
        print(
            f"note: the {n} tokens fit in the {which} (--cache-size {ccfg.cache_size}, "
            f"--chunk-size {ccfg.chunk_size}): nothing is compressed, the result is full "
            "attention's",
            file=sys.stderr,
        )


def attach_policy(args, cfg, params, ccfg: CompressionConfig) -> tuple[CompressionConfig, dict]:
    """-> (CompressionConfig, params with the policy's subtree)."""
    path = args.compressors if ccfg.policy == "lococo" else None
    params, ccfg, trained = compressors.with_policy_params(params, cfg, ccfg, path)
    if trained is False:
        print(
            f"note: no trained compressors for this model at M={ccfg.cache_size} "
            f"B={ccfg.chunk_size} (the committed ones are for the embedded SmolLM2); using an "
            "untrained random init (pass --compressors PATH)",
            file=sys.stderr,
        )
    return ccfg, params


def _encode(tok, text: str) -> np.ndarray:
    try:
        ids = tok.encode(text, add_special_tokens=False)
    except TypeError:  # the byte tokenizer takes no options
        ids = tok.encode(text)
    return np.asarray(ids, np.int32)


def _decode(tok, ids: list[int]) -> str:
    if hasattr(tok, "decode"):
        return tok.decode(ids)
    return bytes(ids).decode("utf-8", errors="replace")


def tokenizer_first(spec: str) -> Any:
    """The tokenizer of --model without loading its weights, so token counts are checked
    before the (slow) model load; None where that needs the model (the first run of smollm2)
    or fails (the model load then reports why)."""
    from lococo_jax import convert, models
    from lococo_jax.tokenizer import ByteTokenizer, load_tokenizer

    if spec == "tiny":
        return ByteTokenizer()
    path = models.default_cache_dir() if spec == "smollm2" else Path(spec).expanduser()
    if spec == "smollm2" and not convert.is_converted(path):
        return None
    try:
        return load_tokenizer(path)
    except (OSError, ValueError):
        return None


def early_tokens(args, text: str, where: str, minimum: int) -> np.ndarray | None:
    tok = tokenizer_first(args.model)
    return None if tok is None else tokens_of(tok, text, where, minimum)


def tokens_of(tok, text: str, where: str, minimum: int) -> np.ndarray:
    ids = _encode(tok, text)
    if len(ids) < minimum:
        raise UserError(f"{where}: {len(ids)} token(s), at least {minimum} needed")
    return ids


# ------------------------------------------------------------------ commands


def cmd_convert(args: argparse.Namespace) -> None:
    from lococo_jax import convert

    src = Path(args.src).expanduser()
    if not src.exists():
        raise UserError(f"convert: source {args.src}: no such file or directory")
    convert.check_destination(args.dst, args.overwrite, src)
    out = convert.convert(src, args.dst, overwrite=args.overwrite)
    print(f"converted {args.src} -> {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    check_model_spec(args.model)
    if args.prompt_file:
        text = read_text(args.prompt_file, "--prompt-file")
    elif not args.prompt.strip():
        raise UserError("--prompt is empty")
    else:
        text = args.prompt
    sampling = generate.SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    ccfg = compression_config(args, args.policy)
    where = args.prompt_file or "--prompt"
    ids = early_tokens(args, text, where, 1)
    cfg, params, tok = load_model(args.model)
    ids = tokens_of(tok, text, where, 1) if ids is None else ids
    check_positions(
        cfg, len(ids) + args.max_new_tokens, "the prompt plus --max-new-tokens", args.past_positions
    )
    if args.policy == "full":
        ccfg = dataclasses.replace(ccfg, cache_size=len(ids) + args.max_new_tokens)
        check_full_fits(cfg, ccfg)
    ccfg, params = attach_policy(args, cfg, params, ccfg)
    warn_if_uncompressed(ccfg, len(ids) + args.max_new_tokens, reading=False)
    shown: list[int] = []
    printed = ""

    def stream(token: np.ndarray) -> None:  # print the new text as soon as it is sampled
        nonlocal printed
        shown.append(int(token[0]))
        text = _decode(tok, shown)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    out = generate.generate(
        params,
        ids[None],
        cfg,
        ccfg,
        sampling,
        eos_id=cfg.eos_token_id,
        progress=True,
        on_token=stream,
    )
    print(_decode(tok, shown)[len(printed) :])
    print(
        f"\n[{args.policy} M={ccfg.cache_size} B={ccfg.chunk_size}] prompt {len(ids)} tokens in "
        f"{out.prefill_seconds:.1f}s ({len(ids) / max(out.prefill_seconds, 1e-9):.1f} tok/s); "
        f"{out.tokens.shape[1]} new tokens at {out.decode_tokens_per_s:.1f} tok/s",
        file=sys.stderr,
    )


def cmd_perplexity(args: argparse.Namespace) -> None:
    check_model_spec(args.model)
    positive("--max-tokens", args.max_tokens, 2)
    if not (args.rope_linear > 0 and math.isfinite(args.rope_linear)):
        raise UserError(f"--rope-linear must be a positive factor, got {args.rope_linear}")
    text = read_text(args.text_file, "--text-file")
    ccfg = compression_config(args, args.policy)
    ids = early_tokens(args, text, args.text_file, 2)
    cfg, params, tok = load_model(args.model)
    if args.rope_linear != 1.0:
        cfg = cfg.with_linear_rope_scaling(args.rope_linear)
    ids = (tokens_of(tok, text, args.text_file, 2) if ids is None else ids)[: args.max_tokens]
    check_positions(cfg, len(ids), f"{args.text_file} ({len(ids)} tokens)", True)
    if args.policy == "full":
        ccfg = dataclasses.replace(ccfg, cache_size=len(ids))
        check_full_fits(cfg, ccfg)
    ccfg, params = attach_policy(args, cfg, params, ccfg)
    warn_if_uncompressed(ccfg, len(ids), reading=True)
    res = evaluate.perplexity(params, ids, cfg, ccfg, progress=True)
    if not math.isfinite(res.perplexity):
        raise UserError(
            f"the perplexity of {args.text_file} is not finite (mean NLL {res.nll}): the model "
            "produced NaN or infinite logits; are its weights damaged?"
        )
    row = {
        "policy": args.policy,
        "cache_size": ccfg.cache_size,
        "chunk_size": ccfg.chunk_size,
        "tokens": len(ids),
        "perplexity": res.perplexity,
        "tokens_per_s": res.tokens_per_s,
    }
    print(json.dumps(row, allow_nan=False))


def _kv_mb(cfg: LlamaConfig, slots: int, window: int, bytes_per: int = 4) -> float:
    per = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * bytes_per
    return per * (slots + window) / 2**20


def cmd_demo(args: argparse.Namespace) -> None:
    """Read a long held-out document through a fixed M-slot cache and through full attention;
    print memory, speed and perplexity side by side, then continue the document with each."""
    check_model_spec(args.model)
    positive("--tokens", args.tokens, 2)
    positive("--max-new-tokens", args.max_new_tokens, 0)
    text = read_text(args.doc, "--doc")
    lococo_ccfg = compression_config(args, "lococo")
    ids = early_tokens(args, text, args.doc, 2)
    cfg, params, tok = load_model(args.model)
    ids = (tokens_of(tok, text, args.doc, 2) if ids is None else ids)[: args.tokens]
    check_positions(cfg, len(ids) + args.max_new_tokens, "the document plus --max-new-tokens", True)
    full_ccfg = dataclasses.replace(
        lococo_ccfg, policy="full", cache_size=len(ids) + args.max_new_tokens
    )
    check_full_fits(cfg, full_ccfg)
    print(
        f"Document: {Path(args.doc).name}, first {len(ids)} tokens (held out from calibration); "
        f"model: {args.model} ({cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads)"
    )
    runs = []
    for ccfg in (full_ccfg, lococo_ccfg):
        policy = ccfg.policy
        ccfg, p = attach_policy(args, cfg, params, ccfg)
        t0 = time.perf_counter()
        ppl = evaluate.perplexity(p, ids, cfg, ccfg, progress=True, desc=f"{policy} read")
        if not math.isfinite(ppl.perplexity):
            raise UserError(f"the {policy} perplexity is not finite: are the weights damaged?")
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
                text=_decode(tok, gen.tokens[0].tolist()),
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


# ------------------------------------------------------------------ parser and main


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default (ArgumentDefaultsHelpFormatter), but not 'None' / 'False' noise."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    ap = argparse.ArgumentParser(
        prog="python -m lococo_jax", description=__doc__, formatter_class=_Formatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def parser(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, parents=[common], formatter_class=_Formatter
        )

    def model_args(p: argparse.ArgumentParser, policy: bool = True) -> None:
        p.add_argument(
            "--model",
            default="smollm2",
            help="smollm2 (embedded), tiny (random, byte tokenizer), a converted checkpoint "
            "dir, a Hugging Face Llama folder, or a .gguf file",
        )
        p.add_argument("--cache-size", type=int, default=128, help="M: KV slots per layer")
        p.add_argument(
            "--chunk-size", type=int, default=128, help="B: tokens read per chunk (raw window)"
        )
        p.add_argument(
            "--compressors",
            default=None,
            metavar="PATH",
            help="trained lococo compressor weights (.safetensors); default: the committed "
            "ones for (M, B) when --model is the embedded smollm2, else an untrained init",
        )
        if policy:
            p.add_argument(
                "--policy",
                default="lococo",
                choices=sorted(policies.REGISTRY),
                help="KV compression policy (full keeps every token)",
            )

    p = parser("convert", "HF folder or .gguf -> converted (orbax) checkpoint")
    p.add_argument("src", help="a Hugging Face Llama folder or a .gguf file")
    p.add_argument("dst", help="the converted checkpoint folder to write")
    p.add_argument(
        "--overwrite", action="store_true", help="replace dst if it is a converted checkpoint"
    )
    p.set_defaults(fn=cmd_convert)

    p = parser("generate", "continue a (long) prompt with a fixed-size cache")
    model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="the prompt text")
    g.add_argument("--prompt-file", metavar="PATH", help="a UTF-8 text file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (>= 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--past-positions",
        action="store_true",
        help="run even when prompt + new tokens exceed the model's trained positions",
    )
    p.set_defaults(fn=cmd_generate)

    p = parser("perplexity", "perplexity of a text file read through the cache")
    model_args(p)
    p.add_argument("--text-file", required=True, metavar="PATH", help="a UTF-8 text file")
    p.add_argument(
        "--max-tokens", type=int, default=4096, help="score at most this many tokens (>= 2)"
    )
    p.add_argument(
        "--rope-linear", type=float, default=1.0, help="linear RoPE scaling factor (> 0)"
    )
    p.set_defaults(fn=cmd_perplexity)

    p = parser("demo", "the long-context demo on the embedded default model")
    model_args(p, policy=False)
    p.add_argument("--doc", default=str(DEFAULT_DOC), help="the UTF-8 document to read")
    p.add_argument("--tokens", type=int, default=4096, help="read this many tokens (>= 2)")
    p.add_argument(
        "--max-new-tokens", type=int, default=40, help="tokens each policy continues with"
    )
    p.set_defaults(fn=cmd_demo)
    return ap


# Errors whose message names the bad input: printed as they are. Anything else is a bug and
# is printed with its type.
USER_ERRORS = (UserError, ConfigError, ValueError, FileNotFoundError, FileExistsError)
USER_ERRORS += (NotADirectoryError, IsADirectoryError, PermissionError)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if isinstance(e, USER_ERRORS) else f"{msg} ({type(e).__name__})"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # noqa: BLE001 - the top level reports every error as one line
        if args.debug:
            raise
        hint = "" if isinstance(e, USER_ERRORS) else " (--debug for the traceback)"
        print(f"error: {_one_line(e)}{hint}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
