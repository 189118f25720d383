"""The baselines' own settings on the command line, shared by the eval scripts.

Each option takes one or more values; a policy runs once per combination of its own options
(a sweep, for choosing them on the validation text). The defaults are the settings chosen on the
validation text (experiments/results/validation_tuning.md: Northanger Abbey, 2K tokens, M = 256,
3-6 settings per method): streaming 16 sinks (published: 4), h2o recent M/4 (published: M/2),
snapkv window 32, kernel 5, maxpool (published: avgpool). CompressionConfig keeps the published
defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from fractions import Fraction

from lococo_jax.config import CompressionConfig

POLICIES = ["full", "streaming", "h2o", "tova", "snapkv", "keydiff", "lococo"]
OWN = {
    "streaming": ("sink",),
    "h2o": ("h2o_recent",),
    "snapkv": ("snapkv_window", "snapkv_kernel", "snapkv_pooling"),
    "lococo": ("local_len",),
}


def add(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("policy settings (several values: a sweep)")
    g.add_argument("--sink", type=int, nargs="+", default=[16], help="streaming: attention sinks")
    g.add_argument(
        "--h2o-recent", type=Fraction, nargs="+", default=[Fraction(1, 4)], help="h2o: share of M"
    )
    g.add_argument("--snapkv-window", type=int, nargs="+", default=[32])
    g.add_argument("--snapkv-kernel", type=int, nargs="+", default=[5])
    g.add_argument("--snapkv-pooling", nargs="+", default=["max"], choices=["avg", "max"])
    g.add_argument(
        "--local-len",
        type=Fraction,
        nargs="+",
        default=[Fraction(1, 4)],
        help="lococo without committed weights: share of M always kept",
    )
    g.add_argument(
        "--skip-untrained",
        action="store_true",
        help="lococo: skip cells with no committed compressors for their (M, B) (they would be "
        "a random-init fusion, not LoCoCo)",
    )


def configs(args, policy: str, M: int, B: int) -> list[CompressionConfig]:
    """One CompressionConfig per combination of the policy's own settings (invalid ones for
    this M are skipped with a message)."""
    names = OWN.get(policy, ())
    out = []
    for combo in itertools.product(*(getattr(args, n) for n in names)):
        kw = dict(policy=policy, cache_size=M, chunk_size=B)
        for n, v in zip(names, combo, strict=True):
            kw[n] = int(M * v) if n in ("h2o_recent", "local_len") else v
        try:
            out.append(CompressionConfig(**kw))
        except ValueError as e:
            print(f"skip {policy} M={M} {kw}: {e}", flush=True)
    return out


def skip(args, ccfg, trained) -> bool:
    """Whether --skip-untrained drops this cell (lococo without committed compressors)."""
    if trained is False and args.skip_untrained:
        print(f"skip {ccfg.policy} M={ccfg.cache_size}: no committed compressors", flush=True)
        return True
    return False


def describe(ccfg) -> str:
    """The policy and its own settings, e.g. 'snapkv w32 k5 avg' (a CompressionConfig or its
    dict, as stored in a result's key fields)."""
    c = ccfg if isinstance(ccfg, dict) else dataclasses.asdict(ccfg)
    p = c["policy"]
    if p == "streaming":
        return f"streaming sink {c['sink']}"
    if p == "h2o":
        recent = c["cache_size"] // 2 if c["h2o_recent"] is None else c["h2o_recent"]
        return f"h2o recent {Fraction(recent, c['cache_size'])} M"
    if p == "snapkv":
        return f"snapkv w{c['snapkv_window']} k{c['snapkv_kernel']} {c['snapkv_pooling']}"
    return p


BASELINES = ["streaming", "h2o", "tova", "snapkv", "keydiff"]


def chosen(label: str) -> bool:
    """Whether a describe() label is a baseline at its validation-chosen setting (the defaults
    of add()): the only rows a 'best baseline' may be picked from. Other settings in a result
    file are sweeps, not candidates (choosing among them on a test set would tune on it)."""
    ap = argparse.ArgumentParser()
    add(ap)
    defaults = ap.parse_args([])
    labels = {describe(c) for p in BASELINES for c in configs(defaults, p, 512, 128)}
    return label in labels
