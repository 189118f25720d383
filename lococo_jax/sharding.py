"""Device mesh ("data", "fsdp", "tensor") and one logical-axis rules table.

Every array that the train step takes (params incl. the ``lora`` and ``lococo`` subtrees, the
optimiser state, the KV state, the batch) gets a PartitionSpec from the logical names of its
dims through ``RULES``. The spec logic works on shapes and a {axis: size} dict, so it is
testable without devices; ``make_mesh`` and ``named`` turn it into shardings.

Indivisible dims: a dim whose size is not a multiple of the product of its mesh axes raises
ShardingError naming the array path, the dim, its size and the mesh axes, unless
``replicate_indivisible`` is set, in which case that one dim (only) is replicated. Example:
SmolLM2 has 3 KV heads, so the KV state's kv_heads dim cannot be split over tensor=2. The
flattened projection dims (heads * head_dim) are checked on their flattened size: GSPMD may
split them inside a head, which is correct (it reshards as needed), only less efficient.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lococo_jax.config import ConfigError

AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes (None: replicated). The one place that decides the layout.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),  # hidden features of weights (ZeRO-3 style)
    "vocab": ("tensor",),
    "q_heads": ("tensor",),  # heads * head_dim
    "kv_heads": ("tensor",),  # kv_heads (* head_dim for weights)
    "mlp": ("tensor",),
    "layers": None,
    "norm": None,
    "lora_rank": None,
    "conv": None,  # compressor weights: small, replicated
    "head_dim": None,
    "cache": None,  # slots / window entries
    "seq": None,
    "scalar": None,
}


class ShardingError(ValueError):
    """A mesh cannot shard an array as the rules ask; the message names path, dim and axis."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 (= the devices left over)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    replicate_indivisible: bool = False

    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


def resolve_mesh_shape(shape: tuple[int, ...], n_devices: int) -> tuple[int, int, int]:
    """Fill a -1 with the devices left over; error (naming the fields) if it does not fit."""
    names = [f"mesh_{a}" for a in AXES]
    if len(shape) != 3:
        raise ConfigError(f"mesh shape must have 3 sizes {names}, got {shape}")
    if sum(s == -1 for s in shape) > 1:
        raise ConfigError(f"config fields {names}: at most one may be -1, got {shape}")
    for n, s in zip(names, shape, strict=True):
        if s != -1 and s < 1:
            raise ConfigError(f"config field '{n}': must be >= 1 or -1, got {s}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ConfigError(
                f"mesh {dict(zip(names, shape, strict=True))}: the fixed sizes (product {known}) "
                f"do not divide the {n_devices} devices"
            )
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ConfigError(
            f"mesh {dict(zip(names, shape, strict=True))} needs {math.prod(shape)} devices, "
            f"but {n_devices} are available (jax.device_count()); set one size to -1 to auto-fill"
        )
    return shape  # type: ignore[return-value]


def make_mesh(mcfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mcfg.shape(), len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def mesh_sizes(mesh: Mesh | dict[str, int]) -> dict[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def logical_to_spec(
    logical: tuple[str | None, ...],
    shape: tuple[int, ...],
    sizes: dict[str, int],
    path: str = "",
    replicate_indivisible: bool = False,
    rules: dict[str, tuple[str, ...] | None] = RULES,
) -> PartitionSpec:
    """PartitionSpec for one array of ``shape`` whose dims have the ``logical`` names."""
    if len(logical) != len(shape):
        raise ShardingError(f"{path}: logical axes {logical} do not match shape {shape}")
    out: list[Any] = []
    used: set[str] = set()
    for dim, (name, size) in enumerate(zip(logical, shape, strict=True)):
        if name is not None and name not in rules:
            raise ShardingError(f"{path}: logical axis {name!r} has no rule in sharding.RULES")
        axes = tuple(a for a in (rules.get(name) or ()) if sizes.get(a, 1) > 1 and a not in used)
        n = math.prod(sizes[a] for a in axes) if axes else 1
        if axes and size % n:
            if not replicate_indivisible:
                raise ShardingError(
                    f"{path}: dim {dim} ({name}) has size {size}, not divisible by mesh axes "
                    f"{axes} of total size {n}; change the mesh or set "
                    "replicate_indivisible: true to replicate this dim"
                )
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


# Logical names of every params leaf, by its last path key (and the subtree it is in).
_BASE_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "attn_norm": ("layers", "norm"),
    "mlp_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "q_heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "wo": ("layers", "q_heads", "embed"),
    "bq": ("layers", "q_heads"),
    "bk": ("layers", "kv_heads"),
    "bv": ("layers", "kv_heads"),
    "bo": ("layers", "norm"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "b_gate": ("layers", "mlp"),
    "b_up": ("layers", "mlp"),
    "b_down": ("layers", "norm"),
}
# LoRA: a [L, in, r], b [L, r, out]; in/out as the base projection's.
_LORA_IO = {
    "wq": ("embed", "q_heads"),
    "wk": ("embed", "kv_heads"),
    "wv": ("embed", "kv_heads"),
    "wo": ("q_heads", "embed"),
}


def _keys(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]


def param_logical_axes(path_keys: list[str], ndim: int) -> tuple[str | None, ...]:
    """Logical names of one params leaf (params, lora, lococo) from its path."""
    top, last = path_keys[0], path_keys[-1]
    if top == "lococo":
        return ("layers",) + ("conv",) * (ndim - 1)
    if top == "lora":
        i, o = _LORA_IO[path_keys[1]]
        return ("layers", i, "lora_rank") if last == "a" else ("layers", "lora_rank", o)
    if last in _BASE_AXES:
        return _BASE_AXES[last]
    raise ShardingError(f"{'.'.join(path_keys)}: no logical axes known for this param")


def param_specs(
    params: Any, mesh: Mesh | dict[str, int], replicate_indivisible: bool = False
) -> Any:
    """A tree like ``params`` (arrays or ShapeDtypeStructs) of PartitionSpecs."""
    sizes = mesh_sizes(mesh)

    def one(path, x):
        keys = _keys(path)
        logical = param_logical_axes(keys, len(x.shape))
        return logical_to_spec(logical, x.shape, sizes, ".".join(keys), replicate_indivisible)

    return jax.tree_util.tree_map_with_path(one, params)


# KV state fields (lococo_jax.kv_state.KVState).
_STATE_AXES: dict[str, tuple[str | None, ...]] = {
    "k": ("layers", "batch", "kv_heads", "cache", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "cache", "head_dim"),
    "win_k": ("layers", "batch", "kv_heads", "cache", "head_dim"),
    "win_v": ("layers", "batch", "kv_heads", "cache", "head_dim"),
    "pos": ("layers", "batch", "kv_heads", "cache"),
    "score": ("layers", "batch", "kv_heads", "cache"),
    "win_score": ("layers", "batch", "kv_heads", "cache"),
    "last_score": ("layers", "batch", "cache"),
    "filled": ("batch",),
    "win_valid": ("batch",),
    "win_len": (),
    "seen": ("batch",),
}


def state_specs(state: Any, mesh: Mesh | dict[str, int], replicate_indivisible: bool = False):
    """PartitionSpecs for a KVState (same structure, a PartitionSpec per field)."""
    sizes = mesh_sizes(mesh)
    fields = {
        name: logical_to_spec(
            _STATE_AXES[name],
            getattr(state, name).shape,
            sizes,
            f"kv_state.{name}",
            replicate_indivisible,
        )
        for name in _STATE_AXES
    }
    return state.replace(**fields)


def batch_spec(shape: tuple[int, ...], mesh: Mesh | dict[str, int]) -> PartitionSpec:
    """tokens [batch, length]: batch over data * fsdp (never replicated: an error instead)."""
    return logical_to_spec(("batch", "seq"), shape, mesh_sizes(mesh), "batch.tokens")


def opt_state_specs(opt_state: Any, params: Any, pspecs: Any) -> Any:
    """Optimiser state specs: a leaf shaped like a param (mu, nu, accumulators) at a path that
    ends with that param's path gets its spec; scalars (counts) are replicated."""
    flat = {
        tuple(_keys(p)): s for p, s in jax.tree_util.tree_leaves_with_path(pspecs, is_leaf=_is_spec)
    }
    shapes = {tuple(_keys(p)): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}

    def one(path, x):
        keys = tuple(_keys(path))
        for n in range(len(keys)):
            suffix = keys[n:]
            if suffix in flat and shapes[suffix] == x.shape:
                return flat[suffix]
        if x.ndim:
            raise ShardingError(f"optimiser state {'.'.join(keys)}: no param matches its path")
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(one, opt_state)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpecs -> NamedShardings on ``mesh`` (same tree)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
