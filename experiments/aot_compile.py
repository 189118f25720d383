"""Compile the kernel, chunked inference and the training steps for a TPU slice, on a CPU host.

With libtpu installed (``make aot``; no TPU needed), ``jax.experimental.topologies`` describes
the devices of a named slice ("v5e:2x2", "v4:2x2x1", "v5p:2x2x1", "v6e:4x4", ...). Each program
is built with abstract arguments (jax.ShapeDtypeStruct with a NamedSharding on the topology's
devices: no weights, no memory), lowered under ``jax.set_mesh`` with
``CompressionConfig.fusion_platform="tpu"`` (so the compiled Mosaic kernel is in the program,
per shard), and compiled by the real TPU compiler. Reported per program: compiled or the
compiler's error, per-chip argument / output / temp bytes (compiled.memory_analysis()) against
the chip's HBM, FLOPs and bytes (compiled.cost_analysis()), a roofline step time at the chip's
peak bf16 FLOP/s and HBM bandwidth, tokens/s and MFU bounds, and the compile time.

Roofline caveat: XLA's cost analysis counts the body of a while loop once, and the chunked
model is a scan over chunks of a scan over layers, so its HLO FLOPs/bytes are those of one
iteration. The roofline therefore uses analytic counts (``model_counts``): 2 FLOPs per weight
per token (x3 with a full backward, x2 for activation gradients only) plus attention over the
M + B entries, and the bytes of every weight read once per chunk. The HLO figures are reported
beside them, as is the kernel's (a Pallas call has no XLA cost; its FLOPs are counted here).

Usage (results go to experiments/results/aot_tpu.json and aot_tpu.md, one record per run):
    python experiments/aot_compile.py kernel --topology v5e:2x2
    python experiments/aot_compile.py inference --model llama2-7b --topology v5e:2x2 --mesh 1,1,4
    python experiments/aot_compile.py train --config experiments/configs/llama2_7b_inference.yaml \
        --topology v5p:2x2x1
"""

from __future__ import annotations

import os

# The TPU plugin is only used for its topology description and compiler; CPU stays the
# default backend (and no TPU runtime is initialised on a host without one).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a host-wide lockfile when its plugin starts, so a second compiling process (a
# test while a long compile runs) would abort; these processes only compile, they share no TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.lococo_fusion import conv_softmax_mix  # noqa: E402
from lococo_jax import kv_state, llama, longctx, platforms, policies, sharding  # noqa: E402
from lococo_jax.config import CompressionConfig, ConfigError, LlamaConfig  # noqa: E402
from lococo_jax.models import ARCHITECTURES  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
KERNEL_CALL = "tpu_custom_call"

MODELS = ARCHITECTURES  # the --model choices: shapes only, no weights


def have_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology(name: str) -> tuple[list[Any], platforms.ChipSpec]:
    """The devices of a TPU slice (one per chip: v4 and v5p as megacore, as on a TPU VM)."""
    from jax.experimental import topologies

    if not have_libtpu():
        raise RuntimeError("libtpu is not installed: `make aot` installs requirements-tpu-aot.txt")
    kw = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices)
    return devices, platforms.chip_of(devices[0])


def parse_mesh(text: str, n: int) -> sharding.MeshConfig:
    d, f, t = (int(x) for x in text.split(","))
    sharding.resolve_mesh_shape((d, f, t), n)
    return sharding.MeshConfig(d, f, t, replicate_indivisible=True)


def abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _mem(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "temp", "alias", "generated_code")
    }
    # Live at once on a chip: arguments + outputs + temporaries, less outputs aliasing
    # (donated) arguments.
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _cost(compiled: Any) -> dict[str, float]:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {
        "flops": float(c.get("flops", 0.0)),
        "bytes_accessed": float(c.get("bytes accessed", 0.0)),
        "transcendentals": float(c.get("transcendentals", 0.0)),
    }


def compile_report(
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    mesh: jax.sharding.Mesh,
    chip: platforms.ChipSpec,
    *,
    topology_name: str,
    tokens: int = 0,
    analytic: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    donate_argnums: tuple[int, ...] = (),
    lower: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Lower and compile ``fn(*args)`` (abstract args carrying their shardings) under ``mesh``.
    analytic: per chip per step for the roofline (else the HLO's): "flops", and "bytes" or
    "argument_passes" (bytes = that many reads of the chip's arguments, i.e. its weights);
    "useful_flops": the model FLOPs without rematerialisation (MFU's numerator; else flops)."""
    rec: dict[str, Any] = {
        "name": name,
        "topology": topology_name,
        "chip": chip.name,
        "chips": int(mesh.devices.size),
        "mesh": dict(mesh.shape),
        "hbm_per_chip": chip.hbm_bytes,
        "tokens_per_step": tokens,
        **(extra or {}),
    }
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            lower = lower or jax.jit(fn, donate_argnums=donate_argnums).lower
            lowered = lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    except Exception as e:  # the compiler's error is the report (e.g. out of HBM)
        rec.update(compiled=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
        rec["compile_s"] = round(time.perf_counter() - t0, 1)
        return rec
    t2 = time.perf_counter()
    text = compiled.as_text()
    mem, cost = _mem(compiled), _cost(compiled)
    rec.update(
        compiled=True,
        lower_s=round(t1 - t0, 1),
        compile_s=round(t2 - t1, 1),
        memory=mem,
        hbm_fraction=round(mem["peak"] / chip.hbm_bytes, 4),
        fits=mem["peak"] <= chip.hbm_bytes,
        hlo_cost=cost,
        kernel_calls=len(re.findall(rf'custom_call_target="{KERNEL_CALL}"', text)),
    )
    flops = (analytic or {}).get("flops", cost["flops"])
    nbytes = (analytic or {}).get("bytes", cost["bytes_accessed"])
    if analytic and "argument_passes" in analytic:  # every argument (weights) read n times
        nbytes = analytic["argument_passes"] * mem["argument"]
    t_c, t_m = flops / chip.peak_bf16_flops, nbytes / chip.hbm_bw
    t = max(t_c, t_m, 1e-12)
    rec["roofline"] = {
        "source": "analytic" if analytic else "hlo",
        "flops_per_chip": flops,
        "bytes_per_chip": nbytes,
        "t_compute_s": t_c,
        "t_memory_s": t_m,
        "t_step_s": t,
        "bound": "compute" if t_c >= t_m else "memory",
        # Model FLOPs (no remat recompute) per second at the roofline time, over the peak.
        "mfu_bound": (analytic or {}).get("useful_flops", flops) / chip.peak_bf16_flops / t,
    }
    if tokens:
        rec["roofline"]["tokens_per_s"] = tokens / t
    return rec


# ----------------------------------------------------------------------------------------------
# Analytic counts (per step, whole slice; divided by chips in the roofline).


def model_counts(
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    tokens: int,
    chunks: int,
    *,
    weight_bytes: int,
    grad: str | None = None,
) -> dict[str, float]:
    """FLOPs and HBM bytes of ``tokens`` tokens read in ``chunks`` chunks: 2 FLOPs per matmul
    weight per token, attention of each token over M + B entries (QK^T and PV), the LM head;
    grad None (forward), "activations" (frozen base: activation gradients, x2 more) or "full"
    (x3 more: also weight gradients). Bytes: every weight read once per chunk (forward) and
    again per backward pass; activations and the KV state are small next to them at B = 512."""
    L, D, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = D * qd + 2 * D * kvd + qd * D + 3 * D * I
    matmul_w = L * per_layer + D * cfg.vocab_size
    s = ccfg.cache_size + ccfg.chunk_size
    attn = 4 * L * cfg.num_attention_heads * cfg.head_dim * s  # per token: QK^T + PV
    fwd = tokens * (2 * matmul_w + attn)
    mult = {None: 1, "activations": 2, "full": 3}[grad]
    passes = {None: 1, "activations": 3, "full": 3}[grad]  # fwd, remat fwd, bwd
    return {
        "flops": fwd * mult,
        "bytes": float(weight_bytes) * chunks * passes,
        "weight_passes": chunks * passes,
    }


def kernel_flops(r: int, n: int, d: int, c: int, k: int, backward: bool) -> float:
    """Forward: the conv logits (2 N 2d C k) and A k, A v (2 x 2 C N d), per row. Backward: the
    logits again, dP (2 x 2 C N d), P^T dO (2 x 2 C N d) and the conv's two gradients (2 x
    2 N 2d C k, XLA)."""
    conv, mix = 2 * n * 2 * d * c * k, 4 * c * n * d
    return float(r * (conv + mix + (conv + 2 * mix + 2 * conv if backward else 0)))


# ----------------------------------------------------------------------------------------------
# Programs.


def kernel_records(
    topo: str, dtype: str = "bfloat16", shapes: tuple[int, int, int, int, int] | None = None
) -> list[dict[str, Any]]:
    """The fusion kernel alone on one chip, forward and backward, at Llama-2-7B's shapes for one
    sequence and layer at M = B = 512: R = 32 KV heads, N = M + B - keep = 768 rest entries,
    d = 128, C = 256 fused slots, k = 21 (``shapes`` = (R, N, d, C, k) overrides them)."""
    devices, chip = topology(topo)
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices[:1])
    r, n, d, c, k = shapes or (32, 768, 128, 256, 21)
    dt = jnp.dtype(dtype)
    rep = NamedSharding(mesh, P())
    sd = lambda shape, t: jax.ShapeDtypeStruct(shape, t, sharding=rep)
    args = (sd((r, n, d), dt), sd((r, n, d), dt), sd((k, 2 * d, c), dt), sd((c,), dt))
    vl = jnp.full((r,), n, jnp.int32)

    def fwd(kk, vv, w, b):
        return conv_softmax_mix(kk, vv, [(w, b)], vl, impl="auto", platform="tpu")

    def bwd(kk, vv, w, b):
        loss = lambda *a: sum(o.astype(jnp.float32).sum() for o in fwd(*a))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(kk, vv, w, b)

    io = 2 * r * n * d * dt.itemsize + 2 * r * c * d * dt.itemsize
    extra = {"kind": "kernel", "shapes": dict(R=r, N=n, d=d, C=c, k=k, dtype=dtype)}
    out = []
    for tag, fn, back in (("fwd", fwd, False), ("bwd", bwd, True)):
        an = {"flops": kernel_flops(r, n, d, c, k, back), "bytes": io * (3 if back else 1)}
        out.append(
            compile_report(
                f"kernel_{tag}", fn, args, mesh, chip, topology_name=topo, analytic=an, extra=extra
            )
        )
    return out


def inference_record(
    model: str | LlamaConfig,
    topo: str,
    mesh_text: str,
    *,
    batch: int = 1,
    cache_size: int = 512,
    chunk_size: int = 512,
    segment_chunks: int = 8,
    kernel_size: int = 21,
) -> dict[str, Any]:
    """One call of longctx's compiled segment (the program run_long runs for every segment of
    ``segment_chunks`` chunks): bf16 weights, fp32 compressors, bf16 KV state, NLL output."""
    devices, chip = topology(topo)
    mcfg = parse_mesh(mesh_text, len(devices))
    mesh = sharding.make_mesh(mcfg, devices)
    cfg = MODELS[model] if isinstance(model, str) else model
    model = model if isinstance(model, str) else "custom"
    ccfg = CompressionConfig(
        cache_size=cache_size,
        chunk_size=chunk_size,
        kernel_size=kernel_size,
        fusion_platform=platforms.platform_of(mesh),
    )

    def make_params():
        p = llama.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
        p["lococo"] = policies.init_params(jax.random.PRNGKey(1), cfg, ccfg)
        return p

    params = jax.eval_shape(make_params)
    state = jax.eval_shape(lambda: kv_state.init_state(cfg, ccfg, batch, jnp.bfloat16))
    rep = mcfg.replicate_indivisible
    psh = sharding.named(mesh, sharding.param_specs(params, mesh, rep))
    ssh = sharding.named(mesh, sharding.state_specs(state, mesh, rep))
    n, b, B = segment_chunks, batch, chunk_size
    tok_spec = sharding.logical_to_spec(("seq", "batch", "seq"), (n, b, B), mesh.shape, "", True)
    tsh = NamedSharding(mesh, tok_spec)
    nsh = NamedSharding(mesh, P(*tok_spec[:2]))
    lsh = NamedSharding(mesh, P(tok_spec[1], None))
    i32 = jnp.int32
    args = (
        abstract(params, psh),
        abstract(state, ssh),
        jax.ShapeDtypeStruct((n, b, B), i32, sharding=tsh),
        jax.ShapeDtypeStruct((n, b), i32, sharding=nsh),
        jax.ShapeDtypeStruct((n, b, B), i32, sharding=tsh),
        jax.ShapeDtypeStruct((b, cfg.vocab_size), jnp.float32, sharding=lsh),
    )

    def segment(params, state, tokens, n_new, targets, last):
        return longctx.scan_chunks(
            params, state, tokens, n_new, cfg, ccfg, targets=targets, last_logits=last,
            skip_empty=True,
        )  # fmt: skip

    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    counts = model_counts(cfg, ccfg, n * b * B, n, weight_bytes=weight_bytes)
    chips = mesh.devices.size
    analytic = {"flops": counts["flops"] / chips, "argument_passes": counts["weight_passes"]}
    extra = {
        "kind": "inference",
        "model": model,
        "batch": b,
        "cache_size": cache_size,
        "chunk_size": chunk_size,
        "segment_chunks": n,
        "weight_bytes": weight_bytes,
        "model_flops_per_step": counts["flops"],
    }
    return compile_report(
        f"inference_{model}_M{cache_size}_B{chunk_size}",
        segment,
        args,
        mesh,
        chip,
        topology_name=topo,
        tokens=n * b * B,
        analytic=analytic,
        extra=extra,
        donate_argnums=(1,),
    )


def train_record(
    config: str | Path,
    topo: str,
    overrides: list[str] = (),
    *,
    model: str | LlamaConfig = "llama2-7b",
    name: str | None = None,
) -> dict[str, Any]:
    """One training step of a TrainConfig YAML (lococo_jax.train: ``step(train_state, base,
    tokens)``) built on an abstract base of ``model``'s shapes in the config's param_dtype (the
    YAML's ``model`` path is not read), on the topology's devices with the config's mesh."""
    from lococo_jax import train

    devices, chip = topology(topo)
    tcfg = train.TrainConfig.from_yaml(config, list(overrides))
    cfg = MODELS[model] if isinstance(model, str) else model
    dtype = jnp.dtype(tcfg.param_dtype)
    shapes = llama.param_shapes(cfg)
    base = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    t0 = time.perf_counter()
    try:
        run = train.build(
            tcfg, devices, with_checkpointer=False, model=(cfg, base, None), check_data=False
        )
    except (ConfigError, sharding.ShardingError) as e:  # e.g. a batch the mesh cannot split
        return {
            "name": name or f"train_{Path(config).stem}",
            "topology": topo,
            "chip": chip.name,
            "chips": len(devices),
            "mesh": dict(zip(sharding.AXES, tcfg.mesh().shape(), strict=True)),
            "hbm_per_chip": chip.hbm_bytes,
            "kind": "train",
            "config": str(config),
            "overrides": list(overrides),
            "compiled": False,
            "error": f"{type(e).__name__} (building the run): {e}",
        }
    # The fusion kernel for the target (the mesh's devices), whatever this host's backend.
    assert run.ccfg.fusion_platform == platforms.platform_of(run.mesh) == "tpu", run.ccfg
    build_s = time.perf_counter() - t0
    step = train.make_train_step(run)  # the jitted step, lowered under its mesh
    tokens = tcfg.batch_size * tcfg.sample_len
    n_base = sum(math.prod(x.shape) for x in jax.tree.leaves(base))
    counts = model_counts(
        run.cfg, run.ccfg, tokens, tcfg.clean_period, weight_bytes=0, grad="activations"
    )
    flops = counts["flops"] + (counts["flops"] / 2 if tcfg.remat else 0)  # remat: fwd again
    chips = run.mesh.devices.size
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_ts["trainable"]))
    extra = {
        "kind": "train",
        "config": str(config),
        "overrides": list(overrides),
        "mode": tcfg.mode,
        "batch_size": tcfg.batch_size,
        "clean_period": tcfg.clean_period,
        "block_size": tcfg.block_size,
        "remat": tcfg.remat,
        "base_params": n_base,
        "trainable_params": trainable,
        "model_flops_per_step": flops,
        "build_s": round(build_s, 1),
    }
    return compile_report(
        name or f"train_{Path(config).stem}",
        step,
        (run.abstract_ts, run.abstract_base, run.abstract_batch),
        run.mesh,
        chip,
        topology_name=topo,
        tokens=tokens,
        analytic={
            "flops": flops / chips,
            "useful_flops": counts["flops"] / chips,
            "argument_passes": tcfg.clean_period * 3,
        },
        extra=extra,
        lower=step.lower,
    )


# ----------------------------------------------------------------------------------------------
# Output.


def save(records: list[dict[str, Any]], path: Path = RESULTS / "aot_tpu.json") -> None:
    """Merge into the JSON (keyed by name + topology + mesh) and rewrite the markdown table."""
    old = json.loads(path.read_text()) if path.exists() else {}
    for r in records:
        mesh = "x".join(str(v) for v in r["mesh"].values())
        old[f"{r['name']}@{r['topology']}/{mesh}"] = r
    path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    path.with_suffix(".md").write_text(markdown(old))


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def markdown(recs: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Ahead-of-time compilation for TPU slices (experiments/aot_compile.py)",
        "",
        "Compiled on a CPU host with libtpu's compiler for the named topology; memory per chip "
        "from compiled.memory_analysis() (peak = arguments + outputs + temporaries - aliased), "
        "roofline at the chip's peak bf16 FLOP/s and HBM bandwidth from analytic FLOPs/bytes "
        "(see the script's docstring; XLA's cost analysis counts a scan body once). Training "
        "FLOPs: forward + activation gradients (the base is frozen) + the remat forward; MFU "
        "bound = model FLOPs without the remat forward / (roofline time x peak). These are "
        "upper bounds from the chip's peak, not measurements.",
        "",
        "| program | slice | mesh d,f,t | compiled | args GiB | temp GiB | peak GiB / HBM | "
        "kernel calls | roofline step | bound | tokens/s | MFU bound | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(recs):
        r = recs[key]
        mesh = ",".join(str(v) for v in r["mesh"].values())
        if not r.get("compiled"):
            err = r.get("error", "").splitlines()[0][:120].replace("|", "/")
            lines.append(
                f"| {r['name']} | {r['topology']} | {mesh} | no: {err} | | | | | | | | | "
                f"{r.get('compile_s', '')} |"
            )
            continue
        m, rf = r["memory"], r["roofline"]
        tps = f"{rf['tokens_per_s']:,.0f}" if "tokens_per_s" in rf else ""
        lines.append(
            f"| {r['name']} | {r['topology']} | {mesh} | yes | {_gib(m['argument'])} | "
            f"{_gib(m['temp'])} | {_gib(m['peak'])} / {_gib(r['hbm_per_chip'])}"
            f"{'' if r['fits'] else ' (does not fit)'} | {r['kernel_calls']} | "
            f"{rf['t_step_s'] * 1e3:.2f} ms | {rf['bound']} | {tps} | {rf['mfu_bound']:.2f} | "
            f"{r['compile_s']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernel")
    k.add_argument("--topology", default="v5e:2x2")
    k.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    i = sub.add_parser("inference")
    i.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    i.add_argument("--topology", default="v5e:2x2")
    i.add_argument("--mesh", default="1,1,-1", help="data,fsdp,tensor (-1: the rest)")
    i.add_argument("--batch", type=int, default=1)
    i.add_argument("--cache-size", type=int, default=512)
    i.add_argument("--chunk-size", type=int, default=512)
    i.add_argument("--segment-chunks", type=int, default=8)
    t = sub.add_parser("train")
    t.add_argument("--config", required=True)
    t.add_argument("--topology", required=True)
    t.add_argument("--set", action="append", default=[], help="TrainConfig field=value")
    t.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
    t.add_argument("--name", default=None, help="record name (default train_<config stem>)")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    if a.what == "kernel":
        recs = kernel_records(a.topology, a.dtype)
    elif a.what == "inference":
        recs = [
            inference_record(
                a.model,
                a.topology,
                a.mesh,
                batch=a.batch,
                cache_size=a.cache_size,
                chunk_size=a.chunk_size,
                segment_chunks=a.segment_chunks,
            )
        ]
    else:
        recs = [train_record(a.config, a.topology, a.set, model=a.model, name=a.name)]
    for r in recs:
        print(json.dumps(r, indent=1, default=str))
    if not a.no_save:
        save(recs)


if __name__ == "__main__":
    main()
