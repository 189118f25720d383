"""End to end, side by side on one device: prefill and decode tokens/s and peak memory of
Hugging Face transformers (torch, sdpa attention, full DynamicCache) and of ours (the one-shot
full-attention reference llama.forward, full attention through the chunked scan, lococo and
each baseline policy), on the same SmolLM2-135M weights (fp32), at several prompt lengths.

    python experiments/bench_e2e.py                    # a new run folder under experiments/runs/
    python experiments/bench_e2e.py --write            # experiments/results/bench_e2e_<platform>.*
    python experiments/bench_e2e.py --lengths 1024 4096 --policies lococo h2o

Every case (implementation, policy, length) runs in its own process, so its peak RSS is its own:
"peak RSS" is the largest resident set sampled (every 10 ms) while the case prefills and decodes,
the model's weights included. On a GPU torch runs on CUDA too (--torch-device) and the table's
memory is the device's peak (torch.cuda.max_memory_allocated after the warm-up; jax's allocator
peak_bytes_in_use over the process), the weights included.
Prefill reads the prompt and produces the last position's logits (torch: logits_to_keep=1;
ours: run_long output="last", or the one-shot forward's last row).
Decode then feeds --new-tokens greedy tokens one at a time (the chunk size B = 128 by default,
so our raw window is compressed once in the timed steps, as it is every B tokens in a long
run); torch runs its Python loop with the growing DynamicCache, ours the device loop
(generate.decode_block). Torch's decode figure is the faster of one thread and its default
(half of the steps each: with other jobs on the cores, its default threads wait at OpenMP
barriers on every small op; decode_ms_per_token_by_threads in the JSON; on a GPU one pass).
Compile time (lower + compile of the prefill and decode programs) is timed apart and excluded
from tokens/s; torch runs eagerly (a short untimed warm-up instead).
Cases that cannot finish in time on a CPU (O(L^2) attention at the longest lengths) are
skipped with the reason recorded, and a case that runs past --timeout is recorded as such.
The floor row is the same model with no cache at all (each token attends to itself only): the
matmuls and weight reads alone, the fastest any cached path can prefill and decode on the
device, so it says which speed-up over torch is reachable there at all. Every case decodes
--decode-repeats blocks of --new-tokens, each continuing the generation (no copies of the cache
in the memory figures; torch's cache is 128 tokens longer in each later block, which can only
slow it), and keeps the fastest block; --repeats N
runs every case N times, round robin, and keeps each case's best prefill and best decode (every
run's times are in the JSON): on a machine shared with other jobs a slow spell halves a figure.
Writes JSON, a markdown table (ratios against torch at the same length) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINES = ("streaming", "h2o", "tova", "snapkv", "keydiff")
TEXT = ROOT / "data/austen/prideprejudice.txt"


class RssPeak:
    """The largest RSS of this process, sampled in a thread while a phase runs."""

    def __init__(self, every: float = 0.01):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _device_peak_mb() -> float | None:
    """Peak bytes held by jax's allocator on the first device since the process started (the
    weights included); None where the backend keeps no such count (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


# ---------------------------------------------------------------------------------------------
# One case per process.


def settings(policy: str, M: int) -> dict:
    """The baselines' settings the eval scripts use (chosen on the validation text, see
    experiments/_policy_args.py): streaming 16 sinks, h2o recent M/4, snapkv window 32,
    kernel 5, maxpool, lococo local_len M/4 (capped for a small M). Speed barely depends on
    them."""
    return {
        "streaming": dict(sink=min(16, M // 4)),
        "h2o": dict(h2o_recent=M // 4),
        "snapkv": dict(snapkv_window=min(32, M // 4), snapkv_kernel=5, snapkv_pooling="max"),
        "lococo": dict(local_len=M // 4),
    }.get(policy, {})


def case_torch(args, ids) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    dev = torch.device(args.torch_device)
    model = (
        transformers.LlamaForCausalLM.from_pretrained(
            args.hf_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
        .to(dev)
        .eval()
    )
    rss_loaded = _rss_mb()
    prompt = torch.as_tensor(ids, dtype=torch.long, device=dev)
    n = args.new_tokens
    on_gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def prefill(prompt):
        out = model(prompt, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(cache, tok, n_steps, toks):
        for _ in range(n_steps):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(tok[0, 0]))
        return cache, tok

    # Decoding runs hundreds of small ops per token, each an OpenMP parallel region: with other
    # jobs on the cores, torch's default threads wait at every barrier. Half of the steps run
    # with one thread and half with the default; the faster is torch's decode figure.
    # On a GPU the thread count does not matter: one pass with the default.
    threads = torch.get_num_threads()
    with torch.inference_mode():
        decode(*prefill(prompt[:, :128]), 4, [])  # warm-up (eager: nothing to compile)
        sync()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        with RssPeak() as mem:
            t0 = time.perf_counter()
            cache, tok = prefill(prompt)
            sync()
            t1 = time.perf_counter()
            toks = [int(tok[0, 0])]
            per_thread: dict[int, float] = {}
            for rep in range(args.decode_repeats):  # each continues the generation
                for nt in (threads,) if on_gpu else (1, threads):
                    torch.set_num_threads(nt)
                    t = time.perf_counter()
                    steps = n if on_gpu else (n // 2 if nt == 1 else n - n // 2)
                    cache, tok = decode(cache, tok, steps, toks if rep == 0 else [])
                    sync()
                    dt = (time.perf_counter() - t) / steps
                    per_thread[nt] = min(per_thread.get(nt, dt), dt)
                torch.set_num_threads(threads)
    best = min(per_thread.values())
    return dict(
        prefill_s=t1 - t0,
        decode_s=best * n,
        decode_ms_per_token_by_threads={str(k): 1000 * v for k, v in per_thread.items()},
        compile_prefill_s=None,
        compile_decode_s=None,
        peak_rss_mb=mem.peak / 2**20,
        peak_device_mb=torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        rss_loaded_mb=rss_loaded,
        tokens=toks,
        threads=threads,
        torch_device=str(dev),
    )


def case_ours(args, ids, impl: str, policy: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lococo_jax import generate, llama, longctx, policies
    from lococo_jax.compile_log import CompileLog
    from lococo_jax.config import CompressionConfig
    from lococo_jax.kv_state import init_state
    from lococo_jax.models import load_model

    cfg, params, _ = load_model(args.model)
    L, n, B = ids.shape[1], args.new_tokens, args.chunk_size
    rss_loaded = _rss_mb()
    row: dict = {"threads": os.cpu_count()}
    if impl == "ours-oneshot":

        def last_logits(params, tokens):
            x = llama.hidden_states(params, tokens, cfg, attention=args.attention)
            return llama.lm_head(cfg, params, x[:, -1:])[:, 0]

        t = time.perf_counter()
        fn = jax.jit(last_logits).lower(params, ids).compile()  # called as is: no re-trace
        row["compile_prefill_s"] = time.perf_counter() - t
        row["compile_decode_s"] = None
        with RssPeak() as mem, CompileLog() as timed_compile:
            t0 = time.perf_counter()
            fn(params, ids).block_until_ready()
            row["prefill_s"] = time.perf_counter() - t0
        row["compile_in_timed_s"] = timed_compile.seconds
        row.update(
            decode_s=None,
            peak_rss_mb=mem.peak / 2**20,
            peak_device_mb=_device_peak_mb(),
            rss_loaded_mb=rss_loaded,
        )
        return row

    if impl == "ours-floor":
        return row | case_floor(args, cfg, params, ids)

    total = L + n * args.decode_repeats + 1  # what full attention must hold
    M = -(-total // B) * B if policy == "full" else args.cache_size
    ccfg = CompressionConfig(policy=policy, cache_size=M, chunk_size=B, **settings(policy, M))
    sub = policies.init_params(jax.random.PRNGKey(0), cfg, ccfg)  # random fusion: speed only
    if sub is not None:
        params = dict(params, lococo=sub)
    seg = args.segment_chunks
    state0 = init_state(cfg, ccfg, 1, params["embed"].dtype)
    # Compile the prefill segment and the decode block ahead of the timed runs (jit reuses them).
    zeros = np.zeros((seg, 1, B), np.int32)
    last0 = jnp.zeros((1, cfg.vocab_size), jnp.float32)
    t = time.perf_counter()
    longctx._segment.lower(
        params, state0, zeros, zeros[:, :, 0], zeros, last0, cfg, ccfg, "last", 1.0
    ).compile()
    row["compile_prefill_s"] = time.perf_counter() - t

    def carry_of(state, token):  # committed like decode_block's returned carry: one program
        carry = generate.DecodeCarry(state, token, jax.random.PRNGKey(0), token == -1)
        return longctx.on_params_device(carry, params)

    def decode(carry, steps):
        return generate.decode_block(
            params, carry, np.int32(steps), np.int32(-1), cfg, ccfg, 0.0, 1.0, n
        )

    token0 = jnp.zeros((1,), jnp.int32)
    t = time.perf_counter()
    generate.decode_block.lower(
        params, carry_of(state0, token0), np.int32(n), np.int32(-1), cfg, ccfg, 0.0, 1.0, n
    ).compile()
    row["compile_decode_s"] = time.perf_counter() - t
    # Untimed warm-up of both calls exactly as the timed ones make them (their arguments
    # committed to the device the same way: an uncommitted token would make jit compile
    # decode_block again inside the timed decode). The ahead-of-time compiles above only
    # time the compiler; jit's own cache is filled here.
    warm = longctx.run_long(params, ids[:, :B], cfg, ccfg, output="last", segment_chunks=seg)
    wtok = jnp.argmax(warm.last_logits, -1).astype(jnp.int32)
    jax.block_until_ready(decode(carry_of(warm.state, wtok), 2))
    del warm, wtok
    with RssPeak() as mem, CompileLog() as timed_compile:
        t0 = time.perf_counter()
        res = longctx.run_long(params, ids, cfg, ccfg, output="last", segment_chunks=seg)
        token = jnp.argmax(res.last_logits, -1).astype(jnp.int32)
        token.block_until_ready()
        kv_mb = sum(x.nbytes for x in jax.tree.leaves(res.state)) / 2**20
        t1 = time.perf_counter()
        first = np.asarray(token)  # before the call donates it
        carry, decode_runs, tokens = carry_of(res.state, token), [], None
        for _ in range(args.decode_repeats):  # each continues the generation where it stopped
            t = time.perf_counter()
            toks, n_out, carry = decode(carry, n)
            toks = np.asarray(toks)
            decode_runs.append(time.perf_counter() - t)
            assert int(n_out) == n
            tokens = toks if tokens is None else tokens
    row.update(
        prefill_s=t1 - t0,
        decode_s=min(decode_runs),
        decode_s_runs=decode_runs,
        peak_rss_mb=mem.peak / 2**20,
        peak_device_mb=_device_peak_mb(),
        rss_loaded_mb=rss_loaded,
        compile_in_timed_s=timed_compile.seconds,
        cache_size=M,
        kv_state_mb=kv_mb,
        tokens=[int(t) for t in np.concatenate([first, tokens[0]])],
    )
    return row


def case_floor(args, cfg, params, ids) -> dict:
    """The weights' floor of any cached path on this device: the same model where every token
    attends to itself only (a cache of size 0: no attention work, no cache to read or
    compress), so a prefill chunk and a decode step cost only their matmuls and the reads of
    the weights. Prefill runs the prompt in chunks of B (a lax.scan); decode feeds back greedy
    tokens in a device loop, as generate.decode_block does."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lococo_jax import llama
    from lococo_jax.compile_log import CompileLog

    L, n, B = ids.shape[1], args.new_tokens, args.chunk_size

    def layers(params, x):  # [1, T, hidden] -> [1, T, hidden]
        pos = jnp.zeros(x.shape[:2], jnp.int32)

        def layer(x, lp):
            _, _, v = llama.qkv(cfg, lp, x, pos)
            own = jnp.repeat(v, cfg.q_per_kv, axis=2)  # softmax over the token itself: v
            return llama.attn_out_and_mlp(cfg, lp, x, own), None

        return jax.lax.scan(layer, x, params["layers"])[0]

    def prefill(params, chunks):  # [n_chunks, 1, B] -> the greedy next token [1]
        x0 = jnp.zeros(chunks.shape[1:] + (cfg.hidden_size,), params["embed"].dtype)
        x, _ = jax.lax.scan(lambda _, c: (layers(params, llama.embed(params, c)), None), x0, chunks)
        return jnp.argmax(llama.lm_head(cfg, params, x[:, -1:])[:, 0], -1).astype(jnp.int32)

    def decode(params, token):  # token [1] -> n greedy tokens [n, 1]
        def step(tok, _):
            logits = llama.lm_head(cfg, params, layers(params, llama.embed(params, tok[:, None])))
            nxt = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
            return nxt, nxt

        return jax.lax.scan(step, token, None, length=n)[1]

    pad = -(-L // B) * B - L
    chunks = np.pad(ids, ((0, 0), (pad, 0))).reshape(1, -1, B).transpose(1, 0, 2)
    out: dict = {}
    t = time.perf_counter()
    fp = jax.jit(prefill).lower(params, chunks).compile()
    out["compile_prefill_s"] = time.perf_counter() - t
    token0 = jnp.zeros((1,), jnp.int32)
    t = time.perf_counter()
    fd = jax.jit(decode).lower(params, token0).compile()
    out["compile_decode_s"] = time.perf_counter() - t
    jax.block_until_ready(fd(params, token0))  # warm-up
    with RssPeak() as mem, CompileLog() as timed_compile:
        t0 = time.perf_counter()
        token = fp(params, chunks).block_until_ready()
        t1 = time.perf_counter()
        decode_runs = []
        for _ in range(args.decode_repeats):
            t = time.perf_counter()
            np.asarray(fd(params, token))
            decode_runs.append(time.perf_counter() - t)
    return out | dict(
        prefill_s=t1 - t0,
        decode_s=min(decode_runs),
        decode_s_runs=decode_runs,
        peak_rss_mb=mem.peak / 2**20,
        peak_device_mb=_device_peak_mb(),
        compile_in_timed_s=timed_compile.seconds,
    )


def child(args) -> dict:
    import numpy as np

    impl, policy, L = args.child[0], args.child[1], int(args.child[2])
    ids = np.load(args.ids)[None, :L].astype(np.int32)
    row = case_torch(args, ids) if impl == "torch" else case_ours(args, ids, impl, policy)
    row.update(impl=impl, policy=policy, length=L, new_tokens=args.new_tokens)
    row["max_rss_mb"] = _max_rss_mb()
    row["prefill_tok_s"] = L / row["prefill_s"]
    if row.get("decode_s") is not None:
        row["decode_tok_s"] = args.new_tokens / row["decode_s"]
        row["decode_ms_per_token"] = 1000 * row["decode_s"] / args.new_tokens
    return row


# ---------------------------------------------------------------------------------------------
# The parent: cases, skips, table, plot.


def cases(args) -> list[tuple[str, str]]:
    out = []
    if "torch" in args.impls:
        out.append(("torch", "full"))
    if "oneshot" in args.impls:
        out.append(("ours-oneshot", "full"))
    if "floor" in args.impls:
        out.append(("ours-floor", "none"))
    for p in args.policies:
        out.append(("ours-chunked" if p == "full" else "ours", p))
    return out


def skip_reason(args, impl: str, policy: str, L: int) -> str | None:
    if impl == "ours-chunked" and L > args.max_chunked_full_length:
        return (
            f"the chunked full-attention path attends all M = L slots in every chunk (about "
            f"twice the one-shot's causal work) and would take most of the run's budget "
            f"at {L} tokens (--max-chunked-full-length {args.max_chunked_full_length})"
        )
    if policy == "full" and L > args.max_full_length:
        what = {"torch": "torch full cache", "ours-oneshot": "one-shot full attention"}.get(
            impl, "full attention through the chunked scan"
        )
        return (
            f"{what} at {L} tokens: O(L^2) attention on this CPU would take most of the "
            f"run's budget (--max-full-length {args.max_full_length})"
        )
    if policy in BASELINES and args.max_baseline_length and L > args.max_baseline_length:
        return (
            f"time budget (--max-baseline-length {args.max_baseline_length}): a baseline runs the "
            "same model through the same M and B as lococo, only its compression differs"
        )
    return None


def label(impl: str, policy: str) -> str:
    return {
        "torch": "transformers (torch, sdpa, full cache)",
        "ours-oneshot": "ours: full attention, one-shot llama.forward",
        "ours-chunked": "ours: full attention, chunked scan",
        "ours-floor": "ours: weights only (no cache, each token attends to itself): the floor",
    }.get(impl, f"ours: {policy}")


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def memory_field(rows: list[dict]) -> tuple[str, str]:
    """(field, name) of the memory figure: device memory where every run row measured it (a
    GPU), else the process's peak RSS."""
    ran = [r for r in rows if "skipped" not in r]
    if ran and all(r.get("peak_device_mb") is not None for r in ran):
        return "peak_device_mb", "peak device MB"
    return "peak_rss_mb", "peak RSS MB"


def table(rows: list[dict], lengths: list[int]) -> str:
    torch_by_len = {r["length"]: r for r in rows if r["impl"] == "torch" and "skipped" not in r}
    mem, mem_name = memory_field(rows)
    lines = [
        "| path | L | prefill tok/s | vs torch | decode tok/s | vs torch | decode ms/tok | "
        f"{mem_name} | vs torch | compile s (prefill + decode) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {}
    for r in rows:
        order.setdefault((r["impl"], r["policy"]), len(order))
    for key in sorted(order, key=order.get):
        for L in lengths:
            r = next(
                (r for r in rows if (r["impl"], r["policy"]) == key and r["length"] == L), None
            )
            if r is None:
                continue
            name = label(*key)
            if "skipped" in r:
                lines.append(f"| {name} | {L} | skipped: {r['skipped']} |  |  |  |  |  |  |  |")
                continue
            t = torch_by_len.get(L)

            def ratio(field, inverse=False, r=r, t=t):
                if t is None or r.get(field) is None or t.get(field) is None:
                    return "-"
                v = t[field] / r[field] if inverse else r[field] / t[field]
                return f"{v:.2f}x"

            comp = [r.get("compile_prefill_s"), r.get("compile_decode_s")]
            comp_s = " + ".join(_fmt(c) for c in comp if c is not None) or "- (eager)"
            if r.get("compile_cached"):
                comp_s = f"cached ({comp_s})"
            lines.append(
                f"| {name} | {L} | {_fmt(r['prefill_tok_s'])} | {ratio('prefill_tok_s')} | "
                f"{_fmt(r.get('decode_tok_s'))} | {ratio('decode_tok_s')} | "
                f"{_fmt(r.get('decode_ms_per_token'))} | {_fmt(r[mem], '.0f')} | "
                f"{ratio(mem)} | {comp_s} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    mem, mem_name = memory_field(rows)
    fields = [
        ("prefill_tok_s", "prefill tokens/s"),
        ("decode_ms_per_token", "decode ms per token"),
        (mem, mem_name.replace(" MB", " (MB)")),
    ]
    keys = []
    for r in rows:
        if (r["impl"], r["policy"]) not in keys:
            keys.append((r["impl"], r["policy"]))
    for ax, (field, name) in zip(axes, fields, strict=True):
        for i, key in enumerate(keys):
            rs = [
                r
                for r in rows
                if (r["impl"], r["policy"]) == key and "skipped" not in r and r.get(field)
            ]
            if not rs:
                continue
            style = "s--" if key[0] == "torch" else ("^-" if key[1] == "full" else "o-")
            x, y = [r["length"] for r in rs], [r[field] for r in rs]
            ax.plot(x, y, style, color=f"C{i % 10}", label=label(*key))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def prepare(args, work: Path) -> tuple[Path, Path]:
    """The prompt token ids (.npy) and a Hugging Face folder of the same weights for torch."""
    import jax
    import numpy as np
    import transformers
    from safetensors.numpy import save_file

    from lococo_jax.models import load_model
    from lococo_jax.train.export import hf_state_dict

    cfg, params, tok = load_model(args.model)
    ids = np.asarray(tok.encode(Path(args.text).read_text(encoding="utf-8")), np.int32)
    need = max(args.lengths)
    if len(ids) < need:  # the text repeated: speed and memory do not depend on the words
        ids = np.tile(ids, -(-need // len(ids)))
    ids_path = work / "ids.npy"
    np.save(ids_path, ids[:need])
    hf_dir = work / "hf"
    hf_dir.mkdir()
    hf_cfg = cfg.to_hf_config(for_transformers=True)
    transformers.LlamaConfig(**hf_cfg).save_pretrained(hf_dir)
    tensors = hf_state_dict(cfg, params)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    del params
    jax.clear_caches()
    return ids_path, hf_dir


def run_case(args, impl: str, policy: str, L: int, ids_path, hf_dir, env) -> dict:
    """One case in its own process -> its row, or {"skipped": why} when it failed or ran out
    of time."""
    cmd = [sys.executable, __file__, "--child", impl, policy, str(L)]
    cmd += ["--ids", str(ids_path), "--hf-dir", str(hf_dir)]
    for flag in ("model", "cache_size", "chunk_size", "segment_chunks"):
        cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    cmd += ["--new-tokens", str(args.new_tokens), "--attention", args.attention]
    cmd += ["--decode-repeats", str(args.decode_repeats)]
    cmd += ["--torch-device", args.torch_device]
    load = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"{label(impl, policy):48} {L:6d}  timed out", flush=True)
        return {"skipped": f"timed out after {args.timeout} s"}
    line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
    if out.returncode or not line:
        print(out.stderr[-3000:], file=sys.stderr)
        return {"skipped": f"failed (exit {out.returncode})"}
    r = json.loads(line[0][4:])
    r["load_average_1min_at_start"] = load
    r["wall_s"] = time.perf_counter() - t
    print(
        f"{label(impl, policy):48} {L:6d}  prefill {r['prefill_tok_s']:8.1f} tok/s  "
        f"decode {_fmt(r.get('decode_tok_s')):>6} tok/s  "
        f"peak RSS {r['peak_rss_mb']:6.0f} MB  load {load:.1f}",
        flush=True,
    )
    return r


def merge_repeats(runs: list[dict]) -> dict:
    """One row from a case's repeats: its fastest prefill and its fastest decode (with that
    decode's tokens), the largest memory and timed-compile figures, every repeat's times, and
    the first repeat's compile times (the later ones load its programs from the cache)."""
    row = dict(min(runs, key=lambda r: r["prefill_s"]))
    row["prefill_s_repeats"] = [r["prefill_s"] for r in runs]
    if row.get("decode_s") is not None:
        fast = min(runs, key=lambda r: r["decode_s"])
        for k in ("decode_s", "decode_s_runs", "decode_tok_s", "decode_ms_per_token", "tokens"):
            if k in fast:
                row[k] = fast[k]
        if "decode_ms_per_token_by_threads" in fast:
            row["decode_ms_per_token_by_threads"] = fast["decode_ms_per_token_by_threads"]
        row["decode_s_repeats"] = [r["decode_s"] for r in runs]
    for k in ("peak_rss_mb", "max_rss_mb", "peak_device_mb", "compile_in_timed_s"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        row[k] = max(vals) if vals else None
    for k in ("compile_prefill_s", "compile_decode_s", "compile_cached"):
        row[k] = runs[0].get(k)
    row["load_average_1min_at_start"] = [r["load_average_1min_at_start"] for r in runs]
    row["repeats"] = len(runs)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["full", "lococo", *BASELINES],
        help="ours through the chunked scan ('full': every token kept)",
    )
    ap.add_argument(
        "--impls",
        nargs="+",
        default=["torch", "oneshot", "floor"],
        choices=["torch", "oneshot", "floor"],
        help="besides the policies: transformers, our one-shot full-attention forward, and the "
        "weights-only floor (the model with no cache: the fastest any cached path can be)",
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cache-size", type=int, default=128, help="M of the compressing policies")
    ap.add_argument("--chunk-size", type=int, default=128, help="B: prefill chunk, raw window")
    ap.add_argument("--segment-chunks", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128, help="timed decode steps")
    ap.add_argument("--attention", default="flash", help="llama.forward's implementation")
    ap.add_argument(
        "--max-full-length",
        type=int,
        default=16384,
        help="skip full-attention cases (torch too) above this length, with the reason",
    )
    ap.add_argument(
        "--max-chunked-full-length",
        type=int,
        default=4096,
        help="skip full attention through the chunked scan above this length",
    )
    ap.add_argument(
        "--max-baseline-length",
        type=int,
        default=None,
        help="skip the baselines (not lococo) above this length, with the reason",
    )
    ap.add_argument("--timeout", type=int, default=900, help="seconds per case before it is cut")
    ap.add_argument(
        "--decode-repeats",
        type=int,
        default=3,
        help="timed decodes of --new-tokens per case, each continuing the generation; the best "
        "is the figure (decode runs are short, so a slow spell of a shared machine decides one)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every case, round robin; each figure is the case's best run (on a "
        "machine shared with other jobs, 2-3 keep a slow spell from deciding a ratio)",
    )
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--note", default="", help="stored in the files (e.g. what else ran)")
    ap.add_argument("--out", default=None, help="JSON path (default: a new run folder)")
    ap.add_argument("--write", action="store_true", help="write experiments/results/bench_e2e_*")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument(
        "--torch-device",
        default=None,
        help="where transformers runs (default: cuda when jax's backend is a GPU, else cpu)",
    )
    args = ap.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return 0

    import jax

    from lococo_jax import results

    platform = jax.default_backend()
    device = f"{platform}:{jax.devices()[0].device_kind}, {os.cpu_count()} cores"
    path = results.output_path(f"bench_e2e_{platform}.json", args.out, args.write)
    args.torch_device = args.torch_device or ("cuda" if platform == "gpu" else "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = []
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as d:
        ids_path, hf_dir = prepare(args, Path(d))
        # One persistent compilation cache for the children: a compressing policy's programs
        # do not depend on the length, so only its first length compiles them (the others
        # load them: their compile column says "cached").
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(Path(d) / "jax_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
        compiled: set[tuple[str, str, int]] = set()
        for L in sorted(args.lengths):
            runs: dict[tuple[str, str], list[dict]] = {}
            skipped: dict[tuple[str, str], str] = {}
            for impl, policy in cases(args):
                reason = skip_reason(args, impl, policy, L)
                if reason:
                    skipped[(impl, policy)] = reason
                    print(f"{label(impl, policy):48} {L:6d}  skipped", flush=True)
            # Repeats go round every case in turn, so a slow spell of a shared machine does not
            # fall on all the repeats of one case; each figure is the case's best repeat.
            for _ in range(args.repeats):
                for impl, policy in cases(args):
                    if (impl, policy) in skipped:
                        continue
                    r = run_case(args, impl, policy, L, ids_path, hf_dir, env)
                    if "skipped" in r:
                        skipped[(impl, policy)] = r["skipped"]
                        continue
                    program = (impl, policy, r.get("cache_size", L))
                    r["compile_cached"] = program in compiled
                    compiled.add(program)
                    runs.setdefault((impl, policy), []).append(r)
            for impl, policy in cases(args):
                base = dict(impl=impl, policy=policy, length=L)
                if (impl, policy) in skipped:  # a failure on any repeat voids the case
                    rows.append(dict(base, skipped=skipped[(impl, policy)]))
                else:
                    rows.append(merge_repeats(runs[(impl, policy)]))
    for r in rows:  # greedy tokens shared with torch's (a check that both read the same text)
        t = next((x for x in rows if x["impl"] == "torch" and x["length"] == r["length"]), None)
        if t and r.get("tokens") and t.get("tokens"):
            same = [a == b for a, b in zip(r["tokens"], t["tokens"], strict=False)]
            r["tokens_agree_with_torch"] = same.index(False) if False in same else len(same)
    load_after = os.getloadavg()
    lengths = sorted(args.lengths)
    md_table = table(rows, lengths)
    print(md_table)
    title = (
        f"{args.model} fp32, {device}; ours M = {args.cache_size}, B = {args.chunk_size}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    doc = {
        "what": "prefill/decode tokens/s and peak RSS: transformers (torch, sdpa, full cache) "
        "vs ours (one-shot full attention, chunked full, compressed policies)",
        "device": device,
        "model": args.model,
        "dtype": "float32",
        "cache_size": args.cache_size,
        "chunk_size": args.chunk_size,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "decode_repeats": args.decode_repeats,
        "attention": args.attention,
        "text": results.text_fingerprint(args.text),
        "note": args.note,
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "total_s": time.perf_counter() - started,
        "rows": rows,
        "provenance": results.provenance_now(),
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    md = [
        f"# End to end, side by side ({platform})",
        "",
        f"Device: {device}. Load average (1/5/15 min) {tuple(round(x, 1) for x in load_before)} "
        f"before, {tuple(round(x, 1) for x in load_after)} after; each row records the "
        "1-minute load at its start in the JSON. Model: "
        f"{args.model}, fp32; ours: M = {args.cache_size}, B = {args.chunk_size} (full: every "
        f"token kept); {args.new_tokens} timed decode steps, the best of "
        f"{args.decode_repeats} consecutive blocks; each figure the best of "
        f"{args.repeats} run(s) of its case (round robin); ratios against transformers "
        "(torch, sdpa, full cache) at the same length. Compile time is apart from tokens/s.",
        "",
        f"Command: `{doc['provenance']['command']}` ({doc['total_s'] / 60:.1f} min).",
        "",
        md_table,
        "",
    ]
    if args.note:
        md.insert(2, f"Note: {args.note}\n")
    path.with_suffix(".md").write_text("\n".join(md))
    plot(rows, path.with_suffix(".png"), title)
    print(f"wrote {path} (.md, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
