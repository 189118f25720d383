"""Ahead-of-time compilation for a TPU v5e 2x2 slice from this CPU host (aot_compile.py): the
fusion kernel forward and backward and the chunked model with fusion_impl auto, each compiled by
libtpu's compiler with the Mosaic kernel in the program and its per-chip memory below the chip's
HBM. Needs the libtpu wheel (no TPU): `make aot` installs it; without it these skip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import aot_compile as aot  # noqa: E402

from lococo_jax.config import LlamaConfig  # noqa: E402

pytestmark = pytest.mark.skipif(
    not aot.have_libtpu(),
    reason="libtpu not installed: `make aot` installs requirements-tpu-aot.txt (TPU compiler, "
    "no TPU needed) and runs these",
)
TOPOLOGY = "v5e:2x2"


def check(rec, kernel_calls):
    assert rec["compiled"], rec.get("error")
    assert rec["chip"] == "v5e" and rec["hbm_per_chip"] == 16 * 2**30
    mem = rec["memory"]
    assert mem["argument"] > 0 and mem["output"] > 0
    assert 0 < mem["peak"] < rec["hbm_per_chip"] and rec["fits"]
    assert rec["kernel_calls"] == kernel_calls, rec["kernel_calls"]
    rf = rec["roofline"]
    assert rf["t_step_s"] == max(rf["t_compute_s"], rf["t_memory_s"]) > 0
    assert 0 < rf["mfu_bound"] <= 1


def test_kernel_forward_and_backward_compile_with_mosaic():
    fwd, bwd = aot.kernel_records(TOPOLOGY, "bfloat16", shapes=(4, 256, 128, 128, 5))
    check(fwd, kernel_calls=1)
    check(bwd, kernel_calls=2)  # the forward kernel (residuals) and the backward kernel


SMALL = LlamaConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)


@pytest.mark.parametrize("mesh", ["1,1,4", "2,1,2"])
def test_chunked_model_compiles_with_the_kernel_per_shard(mesh):
    """fusion_impl auto on a TPU target: the kernel (not its interpreted HLO) is in the program,
    inside the layer scan (one call site), with heads split (tensor=2) or replicated
    (2 KV heads on tensor=4)."""
    rec = aot.inference_record(
        SMALL, TOPOLOGY, mesh, batch=2, cache_size=128, chunk_size=128, segment_chunks=2,
        kernel_size=5,
    )  # fmt: skip
    check(rec, kernel_calls=1)
    assert rec["tokens_per_step"] == 2 * 2 * 128


def test_tiny_training_step_compiles_on_four_chips():
    """lococo_jax.train's step(train_state, base, tokens) on an abstract base, tiny_cpu.yaml's
    run (batch 8 over data=4): the forward kernel (scan and its remat) and the backward kernel."""
    rec = aot.train_record("experiments/configs/tiny_cpu.yaml", TOPOLOGY, model=SMALL)
    assert rec["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    check(rec, kernel_calls=3)
