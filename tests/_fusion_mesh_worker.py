"""Subprocess helper: the LoCoCo fusion per shard on 8 fake CPU devices.

Run as ``python tests/_fusion_mesh_worker.py``; prints one JSON line ("RESULT {...}") with:
- the chunked model's loss and gradients (every leaf) with fusion_impl="pallas" (interpret) on
  a 2x2x2 mesh vs one device (max relative differences);
- the collectives in the compiled HLO of the fusion alone, per shard (lococo_jax.fusion) and
  as a plain call under the same input shardings (where GSPMD must gather the kernel's
  operands), forward and backward.
"""

from _fake_cpu import use_fake_cpu_devices

use_fake_cpu_devices(8)  # before jax is imported

import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from kernels.lococo_fusion import conv_softmax_mix  # noqa: E402
from lococo_jax import fusion, kv_state, llama, longctx, policies, sharding  # noqa: E402
from lococo_jax.config import CompressionConfig, LlamaConfig  # noqa: E402

CFG = LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
CCFG = CompressionConfig(cache_size=16, chunk_size=8, kernel_size=3, fusion_impl="pallas")
B, CHUNKS = 4, 3  # 3 chunks of 8 tokens through 16 slots: the third compresses
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def params():
    p = llama.init_params(CFG, jax.random.PRNGKey(0), jnp.float32, std=0.1)
    p["lococo"] = policies.init_params(jax.random.PRNGKey(1), CFG, CCFG)
    p["lococo"]["convs"][0]["w"] = p["lococo"]["convs"][0]["w"] * 0.1  # softmax not one-hot
    return p


def loss(p, tokens, targets):
    state = kv_state.init_state(CFG, CCFG, B)
    n_new = jnp.full(tokens.shape[:2], CCFG.chunk_size, jnp.int32)
    _, _, nll = longctx.scan_chunks(p, state, tokens, n_new, CFG, CCFG, targets=targets)
    return jnp.sum(nll) / nll.size


def data():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (B, CHUNKS * CCFG.chunk_size + 1))
    chunk = lambda x: jnp.asarray(x.reshape(B, CHUNKS, CCFG.chunk_size).transpose(1, 0, 2))
    return chunk(ids[:, :-1]), chunk(ids[:, 1:])


def model_vs_single(shape):
    p, (tok, tgt) = params(), data()
    ref_l, ref_g = jax.jit(jax.value_and_grad(loss))(p, tok, tgt)
    mesh = Mesh(np.asarray(jax.devices()).reshape(shape), sharding.AXES)
    psh = sharding.named(mesh, sharding.param_specs(p, mesh))
    bsh = NamedSharding(mesh, P(None, ("data", "fsdp"), None))  # tokens [chunks, b, B]
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(psh, bsh, bsh))
    with jax.set_mesh(mesh):
        l, g = step(p, tok, tgt)
        hlo = step.lower(p, tok, tgt).as_text()
    rel = lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
    grads = {
        jax.tree_util.keystr(k): rel(np.asarray(a), np.asarray(b))
        for (k, a), b in zip(
            jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(ref_g), strict=True
        )
    }
    return {
        "loss": float(l),
        "ref_loss": float(ref_l),
        "loss_rel": abs(float(l) - float(ref_l)) / abs(float(ref_l)),
        "grad_rel": grads,
        "shard_maps": hlo.count("sdy.manual_computation") + hlo.count("SPMDFullToShardShape"),
    }


def fusion_collectives(shape=(2, 2, 2)):
    """Compiled HLO collectives of the fusion alone on k, v [b=4, h=2, N=24, d=16] sharded as the
    KV state: on a 2x2x2 mesh the rows are split over all 8 devices; on 2x1x4 the 2 heads do
    not divide tensor=4, so each row is on 4 devices (replicated there). Conv weights
    replicated."""
    rng = np.random.default_rng(1)
    b, h, n, d, c, ks = 4, 2, 24, 16, 8, 3
    k = jnp.asarray(rng.standard_normal((b, h, n, d), np.float32))
    v = jnp.asarray(rng.standard_normal((b, h, n, d), np.float32))
    w = jnp.asarray(rng.standard_normal((ks, 2 * d, c), np.float32) * 0.2)
    bias = jnp.zeros((c,), jnp.float32)
    nv = jnp.asarray([24, 20, 9, 24], jnp.int32)
    mesh = Mesh(np.asarray(jax.devices()).reshape(shape), sharding.AXES)
    rows = NamedSharding(mesh, fusion.row_specs(mesh.abstract_mesh, b, h)[0])
    rep = NamedSharding(mesh, P())
    bsh = NamedSharding(mesh, P(("data", "fsdp")))

    def per_shard(k, v, w, bias, nv):
        return fusion.fuse_rest(CCFG, k, v, [(w, bias)], nv)

    def plain(k, v, w, bias, nv):
        ok, ov = conv_softmax_mix(
            k.reshape(b * h, n, d), v.reshape(b * h, n, d), [(w, bias)], jnp.repeat(nv, h)
        )
        return ok.reshape(b, h, c, d), ov.reshape(b, h, c, d)

    def grad_of(fn):
        def g(k, v, w, bias, nv):
            f = lambda *a: sum(jnp.sum(o * o) for o in fn(*a, nv))
            return jax.grad(f, argnums=(0, 1, 2, 3))(k, v, w, bias)

        return g

    out, vals = {}, {}
    args = (k, v, w, bias, nv)
    shards = (rows, rows, rep, rep, bsh)
    for name, fn in (("per_shard", per_shard), ("plain", plain)):
        for kind, f in (("fwd", fn), ("bwd", grad_of(fn))):
            jf = jax.jit(f, in_shardings=shards)
            with jax.set_mesh(mesh):
                compiled = jf.lower(*args).compile()
                vals[name, kind] = jax.tree.map(np.asarray, jf(*args))
            text = compiled.as_text()
            out[f"{name}_{kind}"] = {
                c: len(re.findall(rf"\b{c}(?:-start)?\(", text)) for c in COLLECTIVES
            }
    out["values_rel"] = max(
        float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
        for kind in ("fwd", "bwd")
        for a, b in zip(
            jax.tree.leaves(vals["per_shard", kind]),
            jax.tree.leaves(vals["plain", kind]),
            strict=True,
        )
    )
    return out


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    res = {"fusion": fusion_collectives(), "fusion_2x1x4": fusion_collectives((2, 1, 4))}
    res["model"] = model_vs_single((2, 2, 2))
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
