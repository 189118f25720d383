"""TrainConfig: one flat frozen dataclass (YAML: one key per field), type-checked field by field.

Every value, from YAML, ``--set key=value`` or Python, is checked against its field's type
before anything else happens: bools accept true/false only, ints reject floats and strings,
floats accept ints; the error names the field, the value and where it came from.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lococo_jax import data, lora, optim, sharding
from lococo_jax.config import CompressionConfig, ConfigError

OBJECTIVES = ("lm", "distill", "lm+distill", "layerwise")

# Fields that may change between a checkpoint and its resume. ``steps`` may grow: a finished
# run is extended by raising it (the schedule is then recomputed for the new length).
RESUMABLE_FIELDS = frozenset(
    {
        "steps",
        "stop_after",
        "checkpoint_every",
        "checkpoint_keep",
        "log_dir",
        "log_every",
        "progress",
        "distributed",
        "token_cache_dir",
    }
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Model: a models.load_model spec ("tiny", "smollm2", a .gguf, an HF folder, a converted
    # checkpoint directory).
    model: str = "tiny"
    tokenizer: str = "auto"  # "auto": the model's ("bytes" for tiny); "bytes"; or a path
    param_dtype: str = "float32"  # the frozen base's dtype (the trainable leaves stay fp32)
    # Compression (CompressionConfig); block_size is its chunk_size B.
    policy: str = "lococo"
    cache_size: int = 16
    block_size: int = 8
    hh_keep_rate: float = 0.5
    local_len: int = 0
    kernel_size: int = 3
    n_convlayer: int = 1
    expand: int = 1
    activation: str = "relu"
    normalizer_init: float = 0.5
    normalizer: str = "sigmoid"  # see CompressionConfig.normalizer
    conv_init: str = "normal"
    fusion_impl: str = "auto"
    # Start the compressors from this safetensors file (compressors.save_compressors format)
    # instead of a random init: continued calibration with a fresh schedule. A fresh run only;
    # a resume restores its checkpoint.
    init_compressors: str | None = None
    # Training.
    mode: str = "inference"
    # What the trainable leaves learn from (OBJECTIVES): "lm" the next-token loss through the
    # compressed cache; "distill" the KL divergence from the frozen base model's own
    # full-attention next-token distribution (teacher logits from one forward pass per sample);
    # "lm+distill" NLL + distill_weight * KL; "layerwise" the layer-local attention-output loss
    # (train.layerwise: compressors only, inference mode, train_norms_embed false).
    objective: str = "lm"
    distill_weight: float = 1.0
    clean_period: int = 4
    batch_size: int = 8
    steps: int = 20
    stop_after: int | None = None  # stop early at this step (a planned preemption)
    lr: float = 1e-3
    memory_lr_scale: float = 1000.0
    norm_lr_scale: float = 5.0
    train_norms_embed: bool = True
    warmup_steps: int = 0
    decay: str = "cosine"
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    remat: bool = True
    truncate: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    # post_training: linear RoPE scaling factor. None: just enough to cover a sample
    # (sample_len / max positions, at least 1); a number: that factor, so that a model can be
    # tuned for a longer window on shorter samples (cheaper steps, more of them).
    rope_factor: float | None = None
    # Mesh (-1: auto-fill with the remaining devices).
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    replicate_indivisible: bool = False
    # Multi-host: call jax.distributed.initialize() first, with no arguments: jax detects
    # Cloud TPU pods, SLURM, Open MPI and Kubernetes; elsewhere call it yourself with the
    # coordinator, process count and id before train() (train then skips it).
    distributed: bool = False
    # Checkpoints and logs.
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    checkpoint_keep: int = 3
    log_dir: str | None = None
    log_every: int = 1
    progress: bool = True
    # Data.
    data_source: str = "local"
    data_files: tuple[str, ...] = ()
    tfds_name: str = "pg19"
    data_dir: str = "~/tensorflow_datasets"
    data_split: str = "train"
    text_key: str = "text"  # the examples' text feature (pg19: "book_text")
    max_documents: int | None = None
    token_cache_dir: str | None = None  # see data.DataConfig.token_cache_dir
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_type(f.name, getattr(self, f.name)))

        def check(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{field}': {msg}")

        for name in ("clean_period", "batch_size", "steps", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            check(v >= 1, name, f"must be >= 1, got {v!r}")
        check(self.checkpoint_keep >= 1, "checkpoint_keep", "must be >= 1")
        check(self.param_dtype in ("float32", "bfloat16"), "param_dtype", "float32 | bfloat16")
        check(
            self.steps % self.grad_accum == 0,
            "steps",
            f"{self.steps} must be a multiple of grad_accum ({self.grad_accum})",
        )
        check(
            self.stop_after is None or 1 <= self.stop_after <= self.steps,
            "stop_after",
            f"must be in [1, steps={self.steps}] or null, got {self.stop_after}",
        )
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(
            self.rope_factor is None or (self.mode == "post_training" and self.rope_factor >= 1),
            "rope_factor",
            f"must be null, or >= 1 with mode post_training, got {self.rope_factor!r} "
            f"(mode {self.mode})",
        )
        check(self.objective in OBJECTIVES, "objective", f"{self.objective!r} not in {OBJECTIVES}")
        check(
            self.distill_weight > 0 or "distill" not in self.objective,
            "distill_weight",
            f"objective {self.objective!r} needs distill_weight > 0, got {self.distill_weight}",
        )
        check(
            self.objective != "layerwise"
            or (
                self.policy == "lococo" and self.mode == "inference" and not self.train_norms_embed
            ),
            "objective",
            "'layerwise' trains the lococo compressors alone: it needs policy lococo, mode "
            "inference and train_norms_embed false",
        )
        self.compression()  # its own checks name its fields
        check(
            self.policy != "lococo" or (self.clean_period - 1) * self.block_size > self.cache_size,
            "clean_period",
            f"{self.clean_period} chunks of {self.block_size} never read a compressed cache of "
            f"{self.cache_size} slots, so the compressors get no gradient; need "
            "(clean_period - 1) * block_size > cache_size",
        )
        self.optim()
        if self.mode == "post_training":
            self.lora()
        self.data()

    # Sub-configs.
    def compression(self) -> CompressionConfig:
        names = [f.name for f in dataclasses.fields(CompressionConfig)]
        kw = {n: getattr(self, n) for n in names if hasattr(self, n)}
        return CompressionConfig(chunk_size=self.block_size, **kw)

    def optim(self) -> optim.OptimConfig:
        return optim.OptimConfig(
            mode=self.mode,
            lr=self.lr,
            memory_lr_scale=self.memory_lr_scale,
            norm_lr_scale=self.norm_lr_scale,
            train_norms_embed=self.train_norms_embed,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
            decay_steps=max(self.steps // self.grad_accum, 1),
            end_lr_ratio=self.end_lr_ratio,
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            grad_accum=self.grad_accum,
        )

    def lora(self) -> lora.LoraConfig:
        return lora.LoraConfig(self.lora_rank, self.lora_alpha, self.lora_targets)

    @property
    def lora_scale(self) -> float:
        return self.lora().scale if self.mode == "post_training" else 1.0

    def mesh(self) -> sharding.MeshConfig:
        return sharding.MeshConfig(
            self.mesh_data, self.mesh_fsdp, self.mesh_tensor, self.replicate_indivisible
        )

    def data(self) -> data.DataConfig:
        return data.DataConfig(
            source=self.data_source,
            files=self.data_files,
            tfds_name=self.tfds_name,
            data_dir=self.data_dir,
            split=self.data_split,
            text_key=self.text_key,
            max_documents=self.max_documents,
            token_cache_dir=self.token_cache_dir,
        )

    @property
    def sample_len(self) -> int:
        return self.block_size * self.clean_period

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Each field's default as in to_dict (tuples as lists)."""
        return {
            f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        where = f" in {source}" if source else ""
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}{where}")
        try:
            return cls(**d)
        except ConfigError as e:
            if source and source not in str(e):
                raise ConfigError(f"{e}{where}") from None
            raise

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
        """Load a YAML file; overrides are 'key=value' with YAML-parsed values."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            d = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(d, dict):
            kind = type(d).__name__
            raise ConfigError(f"{path}: expected a mapping of config fields, got {kind}")
        sources = {k: str(path) for k in d}
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"--set {o!r}: expected key=value")
            k, v = o.split("=", 1)
            k = k.strip()
            try:
                d[k] = _yaml_load(v)
            except yaml.YAMLError:
                d[k] = v
            sources[k] = f"--set {o}"
        known = {f.name for f in dataclasses.fields(cls)}
        for k in d:  # a bad value names where it came from
            if k in known:
                try:
                    check_type(k, d[k])
                except ConfigError as e:
                    raise ConfigError(f"{e} (from {sources[k]})") from None
        return cls.from_dict(d, source=str(path))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-5 (no dot) as a string; read it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


_HINTS: dict[str, Any] | None = None


def _hints() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(TrainConfig)
    return _HINTS


def check_type(name: str, value: Any) -> Any:
    """``value`` checked (and normalised: list -> tuple, int -> float) against field ``name``'s
    type. Raises ConfigError naming the field and the value."""
    hint = _hints()[name]
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))

    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"config field '{name}': expected {expected}"
            f"{' or null' if optional else ''}, got {value!r} ({type(value).__name__})"
        )

    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise bad("a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    raise TypeError(f"TrainConfig field {name!r} has an unhandled type {hint}")  # a bug
