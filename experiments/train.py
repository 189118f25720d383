"""Train LoCoCo compressors (and LoRA in post_training mode).

    python experiments/train.py --config experiments/configs/tiny_cpu.yaml [--set key=value ...]

Resumes automatically from the latest checkpoint in checkpoint_dir (same config and base model
required; ``steps`` may grow to extend a finished run). SIGINT / SIGTERM save the current step
and exit 0. At the end it exports, next to the checkpoints:
  compressors.safetensors  the compressors alone, bound to the model they were trained beside
  model/                   when more than the compressors trained (LoRA, embeddings, norms):
                           the merged model (LoRA folded in, the trained norms and embeddings,
                           the RoPE scaling used in training), loadable by --model
  hf/                      with --hf: the same as a Hugging Face folder (transformers loads it)
A bad config prints one line naming the field and exits 2 (--debug: the traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lococo_jax import checkpoint, compressors, data, train  # noqa: E402
from lococo_jax.config import ConfigError  # noqa: E402
from lococo_jax.train import export  # noqa: E402

USER_ERRORS = (
    ConfigError,
    data.DataError,
    checkpoint.CheckpointConfigError,
    train.BaseMismatchError,
    FileNotFoundError,
)


def run(args: argparse.Namespace) -> int:
    tcfg = train.TrainConfig.from_yaml(args.config, args.set)
    out = train.train(tcfg)
    losses = out["losses"]
    if losses:
        last = max(losses)
        print(f"step {last}: loss {losses[last]:.4f}; {out['tokens_per_s']:.0f} tokens/s")
    done = out["interrupted"] is None and (tcfg.stop_after or tcfg.steps) == tcfg.steps
    if not (done and tcfg.checkpoint_dir) or args.no_export:
        return 0
    tr, r = out["state"]["trainable"], out["run"]
    root = checkpoint.normalize_path(tcfg.checkpoint_dir)  # keeps gs:// URLs
    meta = {"config": tcfg.to_dict(), "base_model": r.base_fingerprint}
    # The compressors go with the model they were trained beside: the base itself, or (when
    # LoRA, embeddings or norms trained too) the merged model exported beside them.
    bound = r.base_fingerprint
    if set(tr) - {"lococo"} or args.hf:
        merged = export.merged_params(r.base, tr, tcfg.lora_scale)
        print(f"merged model -> {export.export_model(root / 'model', r.cfg, merged, r.tokenizer)}")
        if args.hf:
            print(f"HF folder -> {export.export_hf(root / 'hf', r.cfg, merged, r.tokenizer)}")
        bound = compressors.model_fingerprint(r.cfg, merged)
    if "lococo" in tr:
        path = root / "compressors.safetensors"
        export.export_compressors(path, tr, r.ccfg, meta, model=bound)
        print(f"compressors -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="YAML file of TrainConfig fields")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    ap.add_argument("--no-export", action="store_true", help="skip the exports at the end")
    ap.add_argument("--hf", action="store_true", help="also export a Hugging Face folder")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
