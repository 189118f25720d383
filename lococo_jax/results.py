"""Result files of the experiment scripts: every cell keyed by everything that determines it.

A cell's key is the sha256 of a canonical JSON of its key fields: the text (name and sha256),
lengths, trials, seed, model fingerprint (config and a hash of the weights), the compressor
file's hash and every CompressionConfig field. A cell is reused only when all of them match, so
changing any one (another text, another seed, retrained weights) redoes it instead of relabelling
an old number. Each cell also records the command line, device and time that produced it.

Where results go: ``--out FILE`` names the file (resuming it); ``--write`` writes the committed
file under experiments/results/; otherwise each run gets a new folder experiments/runs/<stamp>/,
so the committed results change only when asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "experiments" / "results"
RUNS = ROOT / "experiments" / "runs"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any) -> str:
    """16 hex digits of the sha256 of obj's canonical JSON."""
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:16]


def mean_se(xs: Any) -> tuple[float, float]:
    """Mean and its standard error, sample std (ddof 1) / sqrt(n); SE 0 for a single value.
    For 0/1 outcomes (passkey hits, RULER's per-sample scores on single-answer tasks) an SE of 0
    means every sample agreed, not certainty: with n samples all wrong, the 95% upper bound on
    the rate is about 3 / n."""
    a = np.asarray(xs, np.float64)
    if a.size == 0:
        raise ValueError("mean_se of no values")
    se = float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else 0.0
    return float(a.mean()), se


def block_means(nll: Any, n_tokens: int, block: int) -> list[float]:
    """Mean NLL of each consecutive block of ``block`` predictions among the first
    ``n_tokens - 1`` (the predictions inside the first n_tokens tokens); a short last block is
    dropped unless it is the only one."""
    a = np.asarray(nll, np.float64)[: n_tokens - 1]
    n = max(len(a) // block, 1)
    return [float(a[i * block : (i + 1) * block].mean()) for i in range(n)]


def perplexity_se(blocks: Any) -> float:
    """Standard error of exp(mean NLL) from per-block mean NLLs (delta method: ppl * SE of the
    mean block NLL). Blocks of consecutive tokens, so the correlation between neighbouring
    tokens stays mostly inside a block."""
    m, se = mean_se(blocks)
    return float(np.exp(m) * se)


def paired_se(c: dict, ref: dict | None, L: int) -> float | None:
    """Standard error of cell c's perplexity gap to cell ref at length L, paired over the same
    blocks of the same text (each cell's ``block_nll[str(L)]``, block_means): ppl * SE of the
    per-block NLL differences (delta method). None where either cell lacks per-block NLLs or
    they do not line up."""
    if ref is None or c is ref:
        return None
    a = (c.get("block_nll") or {}).get(str(L))
    b = (ref.get("block_nll") or {}).get(str(L))
    if a is None or b is None or len(a) != len(b):
        return None
    return c["ppl"][str(L)] * mean_se(np.subtract(a, b))[1]


def best_of(entries: list[tuple[str, float, float]], higher: bool = True) -> list[tuple]:
    """entries (label, mean, se) -> the entries whose mean is the best (ties all kept, in
    label order); higher=False for perplexity."""
    if not entries:
        return []
    top = (max if higher else min)(m for _, m, _ in entries)
    return sorted(e for e in entries if e[1] == top)


def best_table(rows: list[dict], fmt: str) -> list[str]:
    """Markdown rows for the eval scripts' best_rows(): dicts with benchmark, length, n, best
    and candidates ((label, mean, se), best first), full ((mean, se) or None) and optionally
    note (appended to the runner-up, e.g. its paired gap to the best)."""
    out = ["| benchmark | L | n | best baseline | its score | runner-up | full |"]
    out.append("|---|---|---|---|---|---|---|")
    for r in rows:
        names = " = ".join(b[0] for b in r["best"])
        _, m, se = r["best"][0]
        rest = [e for e in r["candidates"] if e[0] not in {b[0] for b in r["best"]}]
        runner = "-"
        if rest:
            tied = [e for e in rest if e[1] == rest[0][1]]
            more = f" (and {len(tied) - 1} more tied)" if len(tied) > 1 else ""
            runner = f"{rest[0][0]} {fmt.format(rest[0][1], rest[0][2])}{more}"
        if rest and r.get("note"):
            runner += f" ({r['note']})"
        full = "-"
        if r["full"]:
            full = fmt.format(*r["full"]) if r["full"][1] == r["full"][1] else f"{r['full'][0]:.2f}"
        out.append(
            f"| {r['benchmark']} | {r['length']} | {r['n']} | {names} | {fmt.format(m, se)} "
            f"| {runner} | {full} |"
        )
    return out


def compressor_note(cells: list[dict[str, Any]]) -> str | None:
    """One line naming the compressor files (and their sha256) behind a file's lococo cells,
    or None where there are none: those cells hold for these files only, and a cell is redone
    when its file's hash changes."""
    used = sorted(
        {
            (c["key_fields"]["compressors"]["file"], c["key_fields"]["compressors"]["sha256"])
            for c in cells
            if c.get("key_fields", {}).get("compressors")
        }
    )
    if not used:
        return None
    files = ", ".join(f"{f} (sha256 {h})" for f, h in used)
    return (
        f"lococo cells come from the compressor files committed when they ran: {files}; "
        "rerunning the command computes a new cell wherever a file has changed (tables show "
        "the newest)."
    )


def newest(cells: list[dict[str, Any]], key: Callable[[dict], Any]) -> dict[Any, dict]:
    """One cell per ``key(cell)``: the one finished last (provenance "finished"). A setting
    measured again after its inputs changed (e.g. a new compressor file: a new cell key) keeps
    its old cell in the store, superseded in the tables by the new one."""
    out: dict[Any, dict] = {}
    for c in sorted(cells, key=lambda c: c["provenance"]["finished"]):
        out[key(c)] = c
    return out


def report_footer(cells: list[dict[str, Any]]) -> str:
    """The end of a result file's markdown: the compressor files behind its lococo cells (if
    any) and every command and device its cells came from."""
    note = compressor_note(cells)
    prov = sorted({(c["provenance"]["command"], c["provenance"]["device"]) for c in cells})
    return (
        (note + "\n\n" if note else "")
        + "Commands and devices:\n"
        + "\n".join(f"- `{a}` on {d}" for a, d in prov)
    )


def text_fingerprint(path: str | Path) -> dict[str, str]:
    data = Path(path).read_bytes()
    return {"name": Path(path).name, "sha256": hashlib.sha256(data).hexdigest()[:16]}


# DATA.md's split: every choice is made on the validation text; the test texts are only reported.
SPLITS = {
    "northangerabbey.txt": "validation",
    "prideprejudice.txt": "test",
    "persuasion.txt": "test",
    "emma.txt": "train",
    "mansfieldpark.txt": "train",
    "sensesensibility.txt": "train",
}


def text_split(path: str | Path) -> str:
    """'validation', 'test', 'train' (the Austen split) or 'other'."""
    return SPLITS.get(Path(path).name, "other")


def weights_hash(params: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (order fixed by the tree paths)."""
    import jax

    h = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(params)[0], key=lambda x: jax.tree_util.keystr(x[0])
    ):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(cfg: Any, params: Any, name: str) -> dict[str, str]:
    """{"name", "config": digest of the architecture, "weights": hash of the base weights}.
    Only the base model's weights (params without a "lococo" subtree) are hashed."""
    base = {k: v for k, v in params.items() if k != "lococo"}
    return {"name": name, "config": digest(cfg.to_hf_config()), "weights": weights_hash(base)}


def config_fields(ccfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(ccfg)


def provenance_now() -> dict[str, Any]:
    """The command line, device and time to store beside a cell."""
    import jax

    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "host_cpus": os.cpu_count(),
        "finished": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def output_path(name: str, out: str | None, write: bool, stamp: str | None = None) -> Path:
    """Where a script writes ``name`` (e.g. "perplexity.json"): --out, else the committed file
    with --write, else a new run folder."""
    if out is not None and write:
        raise ValueError("--out and --write are exclusive")
    if out is not None:
        return Path(out)
    if write:
        return COMMITTED / name
    stamp = stamp or _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    return RUNS / stamp / name


class ResultStore:
    """A JSON file of cells {"key": digest, "key_fields": {...}, ...values, "provenance": ...}.

    Cells written before keys existed (no "key") are kept in the file but never reused.
    Several runs may write one file at once: each put() re-reads it under a lock on its folder
    and adds its cell to what is there, so no run's cells overwrite another's."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict[str, Any] = {"cells": []}
        self._load()

    def _load(self) -> None:
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            self.data.setdefault("cells", [])

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive flock on the file's folder (no lock file is left behind)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @property
    def cells(self) -> list[dict[str, Any]]:
        return self.data["cells"]

    def get(self, key_fields: dict[str, Any]) -> dict[str, Any] | None:
        k = digest(key_fields)
        for c in self.cells:
            if c.get("key") == k:
                return c
        return None

    def put(self, key_fields: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """Store (replacing a cell with the same key) and write the file atomically."""
        k = digest(key_fields)
        cell = {"key": k, "key_fields": key_fields, **values, "provenance": provenance_now()}
        with self._locked():
            self._load()
            self.data["cells"] = [c for c in self.cells if c.get("key") != k] + [cell]
            self.save()
        return cell

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def existing_store(name: str, out: str | None, write: bool) -> ResultStore:
    """The result file a --report-only run rewrites the reports of (output_path's choice);
    exits with one line where it does not exist."""
    path = output_path(name, out, write)
    if not path.exists():
        raise SystemExit(f"{path} does not exist")
    return ResultStore(path)


def write_report(store: ResultStore, md: str, plot: Callable[[Path], None]) -> None:
    """Print md and write it, and plot(path) its PNG, beside the store's JSON."""
    print("\n" + md)
    store.path.with_suffix(".md").write_text(md)
    plot(store.path.with_suffix(".png"))
    print(f"wrote {store.path}, {store.path.with_suffix('.md')}, {store.path.with_suffix('.png')}")
