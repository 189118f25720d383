"""Train LoCoCo compressors (and LoRA in post_training mode).

    python experiments/train.py --config experiments/configs/tiny_cpu.yaml [--set key=value ...]

Resumes automatically from the latest checkpoint in checkpoint_dir (same config required).
At the end it exports the compressors (safetensors) and, in post_training mode, the
LoRA-merged params (orbax) next to the checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lococo_jax import checkpoint, lora, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file of TrainConfig fields")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    ap.add_argument("--no-export", action="store_true", help="skip the exports at the end")
    args = ap.parse_args(argv)
    tcfg = train.TrainConfig.from_yaml(args.config, args.set)
    out = train.train(tcfg)
    losses = out["losses"]
    if losses:
        last = max(losses)
        print(f"step {last}: loss {losses[last]:.4f}; {out['tokens_per_s']:.0f} tokens/s")
    done = (tcfg.stop_after or tcfg.steps) == tcfg.steps
    if done and not args.no_export and tcfg.checkpoint_dir:
        params, run = out["state"]["params"], out["run"]
        root = checkpoint.normalize_path(tcfg.checkpoint_dir)  # keeps gs:// URLs
        if "lococo" in params:
            p = checkpoint.export_compressors(
                root / "compressors.safetensors", params, run.ccfg, {"config": tcfg.to_dict()}
            )
            print(f"compressors -> {p}")
        if tcfg.mode == "post_training":
            merged = lora.merge_lora(params, tcfg.lora().scale)
            print(f"LoRA-merged params -> {checkpoint.save_pytree(root / 'merged_params', merged)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
