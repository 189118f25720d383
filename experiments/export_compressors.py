"""Export the compressors of any saved step of a training run (e.g. to choose the step on the
validation text while the run goes on, or to use a run stopped before its last step).

    python experiments/export_compressors.py \\
        --config experiments/configs/smollm2_layerwise_m128.yaml \\
        --step 75 --out runs/layerwise_m128/step75.safetensors

The file is bound to the base model the run trained beside (as experiments/train.py's export)
and records the step in its metadata. A bad config, a missing step or an existing --out prints
one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lococo_jax import train  # noqa: E402
from lococo_jax.config import ConfigError  # noqa: E402
from lococo_jax.train import export  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the run's YAML (TrainConfig)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--step", type=int, default=None, help="default: the latest saved step")
    ap.add_argument("--out", required=True, help="the compressor file to write")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = ap.parse_args(argv)
    try:
        tcfg = train.TrainConfig.from_yaml(args.config, args.set)
        if tcfg.policy != "lococo" or not tcfg.checkpoint_dir:
            raise ConfigError(f"{args.config}: needs policy lococo and a checkpoint_dir")
        if Path(args.out).exists() and not args.overwrite:
            raise ConfigError(f"--out {args.out} exists (pass --overwrite)")
        run = train.build(tcfg)
        ck = run.checkpointer
        steps = ck.manager.all_steps()
        if not steps or (args.step is not None and args.step not in steps):
            raise ConfigError(f"no step {args.step} in {ck.directory} (saved: {sorted(steps)})")
        ts, _, step = ck.restore(run.abstract_ts, args.step)
    except (ConfigError, FileNotFoundError, train.BaseMismatchError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {"config": tcfg.to_dict(), "base_model": run.base_fingerprint, "step": int(step)}
    path = export.export_compressors(
        args.out, ts["trainable"], run.ccfg, meta, model=run.base_fingerprint
    )
    print(f"step {step} of {tcfg.checkpoint_dir} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
