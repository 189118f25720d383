"""Configs: the Llama architecture (read from a Hugging Face config.json) and the KV compression.

Both are frozen dataclasses whose ``__post_init__`` names the field that is wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)
ROPE_TYPES = ("linear", "llama3")
POLICIES = ("full", "streaming", "h2o", "tova", "snapkv", "keydiff", "lococo")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity")
FUSION_IMPLS = ("auto", "pallas", "reference")
NORMALIZERS = ("sigmoid", "clip", "official")
CONV_INITS = ("normal", "fan_in", "spread")
# config.json key of a linear RoPE factor composed on top of llama3 scaling (ours only).
LINEAR_FACTOR_KEY = "lococo_linear_factor"


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field (and the file, if any)."""


def _check(cond: bool, field: str, msg: str, source: str | None = None) -> None:
    if not cond:
        where = f" in {source}" if source else ""
        raise ConfigError(f"config field '{field}'{where}: {msg}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``linear`` divides positions by ``factor``; ``llama3`` rescales
    the low-frequency bands as in Llama 3.1."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # A linear scaling composed on top of llama3 (positions / linear_factor on the llama3
    # frequencies): post-training context extension of a Llama 3 model. 1 = none.
    linear_factor: float = 1.0

    def __post_init__(self):
        _check(
            self.rope_type in ROPE_TYPES,
            "rope_scaling.rope_type",
            f"{self.rope_type!r} is not supported; use one of {ROPE_TYPES} or null",
        )
        _check(self.factor > 0, "rope_scaling.factor", f"must be > 0, got {self.factor}")
        _check(
            self.linear_factor > 0 and (self.rope_type == "llama3" or self.linear_factor == 1),
            "rope_scaling.linear_factor",
            f"composes only with llama3 scaling and must be > 0, got {self.linear_factor} "
            f"with {self.rope_type}",
        )
        if self.rope_type == "llama3":
            _check(
                self.high_freq_factor > self.low_freq_factor,
                "rope_scaling.high_freq_factor",
                "must be > low_freq_factor",
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type"))
        if rope_type == "default":
            return None
        kwargs: dict[str, Any] = {"rope_type": rope_type, "factor": float(d.get("factor", 1.0))}
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key in d:
                kwargs[key] = d[key]
        if LINEAR_FACTOR_KEY in d:
            kwargs["linear_factor"] = float(d[LINEAR_FACTOR_KEY])
        return cls(**kwargs)

    def to_hf(self, for_transformers: bool = False) -> dict[str, Any]:
        """The config.json dict. A llama3 scaling with a composed linear factor is written with
        the extra key LINEAR_FACTOR_KEY, which only this project reads; ``for_transformers``
        refuses it instead (transformers would ignore the key and compute other logits)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        if self.linear_factor != 1.0:
            _check(
                not for_transformers,
                "rope_scaling",
                f"llama3 (factor {self.factor}) composed with linear x{self.linear_factor} has "
                "no transformers equivalent",
            )
            out[LINEAR_FACTOR_KEY] = self.linear_factor
        return out


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-2 / Llama-3 family architecture."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            ok = isinstance(value, int) and value > 0
            _check(ok, name, f"must be a positive int, got {value!r}")
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"{self.num_key_value_heads} must divide num_attention_heads "
            f"({self.num_attention_heads})",
        )
        _check(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        _check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], source: str | None = None) -> LlamaConfig:
        """Build from a Hugging Face ``config.json`` dict; ``source`` names the file in errors.

        transformers 5 writes ``rope_parameters`` ({"rope_theta", "rope_type", "factor", ...})
        instead of top-level ``rope_theta`` / ``rope_scaling``; both formats are read."""
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            d, rp = dict(d), dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            if rp.get("rope_type", rp.get("type", "default")) != "default":
                d.setdefault("rope_scaling", rp)
        model_type = d.get("model_type")
        _check(
            model_type in SUPPORTED_MODEL_TYPES,
            "model_type",
            f"{model_type!r} is not a Llama model; supported: {SUPPORTED_MODEL_TYPES}",
            source,
        )
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        _check(
            all(a in SUPPORTED_ARCHITECTURES for a in archs),
            "architectures",
            f"{archs} not supported; supported: {SUPPORTED_ARCHITECTURES}",
            source,
        )
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            _check(key in d, key, "missing", source)
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                rope_scaling=RopeScaling.from_hf(d.get("rope_scaling")),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos,
            )
        except ConfigError as e:
            if source and source not in str(e):
                raise ConfigError(f"{e} (in {source})") from None
            raise

    @classmethod
    def from_json(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_config(d, source=str(path))

    def to_hf_config(self, for_transformers: bool = False) -> dict[str, Any]:
        """config.json as transformers writes it (see RopeScaling.to_hf for for_transformers)."""
        rope = self.rope_scaling.to_hf(for_transformers) if self.rope_scaling else None
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
        }
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        return d

    def with_linear_rope_scaling(self, factor: float) -> LlamaConfig:
        """Linear RoPE scaling (positions / factor), post-training tuning's extension, composed
        with the model's own scaling: none -> linear(factor); linear(f) -> linear(f * factor);
        llama3 -> llama3 with linear_factor multiplied by factor. Never replaces."""
        _check(factor > 0, "rope_scaling.factor", f"a linear factor must be > 0, got {factor}")
        if factor == 1.0:
            return self
        s = self.rope_scaling
        if s is None:
            new = RopeScaling("linear", float(factor))
        elif s.rope_type == "linear":
            new = dataclasses.replace(s, factor=s.factor * float(factor))
        else:
            new = dataclasses.replace(s, linear_factor=s.linear_factor * float(factor))
        return dataclasses.replace(self, rope_scaling=new)


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """How each attention layer compresses its KV cache.

    cache_size (M) slots per layer and KV head; chunk_size (B) tokens read per step (and the size
    of the raw decode window). ``policy`` picks the compression (see lococo_jax.policies).
    """

    policy: str = "lococo"
    cache_size: int = 128
    chunk_size: int = 128
    # streaming (StreamingLLM): attention sinks kept at the front.
    sink: int = 4
    # h2o: recent entries always kept; None -> cache_size // 2.
    h2o_recent: int | None = None
    # snapkv: the last snapkv_window queries of the chunk that compresses (all of them if the
    # chunk is shorter) score the older entries, summed over those queries and each group's
    # heads, pooled along the entries with a kernel of snapkv_kernel ("avg" or "max", as
    # SnapKV's avg_pool1d / max_pool1d); the last snapkv_window entries are always kept.
    # Defaults: SnapKV's (window 32, kernel 5, avgpool).
    snapkv_window: int = 32
    snapkv_kernel: int = 5
    snapkv_pooling: str = "avg"
    # lococo (DESIGN.md "LoCoCo fusion").
    hh_keep_rate: float = 0.5
    local_len: int = 0
    kernel_size: int = 21
    n_convlayer: int = 1
    expand: int = 1
    activation: str = "relu"
    normalizer_init: float = 0.5
    # Conv weight init: "normal" is N(0, 1) as the official code; "fan_in" is N(0, 1/(in*k)).
    # With N(0, 1) the conv logits have a std of ~50 on SmolLM2's keys/values, so the softmax
    # over positions is nearly one-hot (mean max weight 0.95): a pointer more than a blend.
    # "spread" is N(0, 0.01/(in*k)) with bias 1: the conv logits start nearly equal across
    # positions (and positive, inside relu's linear part), so each fused slot starts as a
    # spread-out blend of the rest entries whose softmax passes gradient to every position.
    conv_init: str = "normal"
    # How the learned normaliser a of W = a A + (1 - a) R is parametrised (NORMALIZERS):
    # "sigmoid": the stored parameter is logit(a); a = sigmoid(param) stays in (0, 1) and its
    #   gradient never vanishes at a bound (the training default).
    # "clip": the stored parameter is a, used clipped to [0, 1]; jnp.clip has zero gradient
    #   outside, so a layer whose a left [0, 1] stops training its conv. Kept to read files
    #   trained before "sigmoid" existed (they say clip_normalizer: true).
    # "official": the stored parameter is a, used as is (the official arithmetic). With a < 0, W
    #   has negative entries: each fused slot extrapolates past its anchor, and since fused slots
    #   are re-fused at every later compression the overshoot compounds (calibrated SmolLM2 at
    #   M=64 with a < 0 in 12 of 30 layers: held-out perplexity 23.8 at 4K, 138 at 8K).
    normalizer: str = "sigmoid"
    fusion_impl: str = "auto"
    # The platform the fusion kernel is built for ("cpu" | "gpu" | "tpu"): the target devices'
    # (platforms.platform_of(mesh)), which a CPU host compiling ahead of time for a TPU slice
    # must set. None: the mesh set with jax.set_mesh, else the default backend.
    fusion_platform: str | None = None

    def __post_init__(self):
        _check(self.policy in POLICIES, "policy", f"{self.policy!r} not in {POLICIES}")
        _check(self.cache_size > 0, "cache_size", f"must be > 0, got {self.cache_size}")
        _check(self.chunk_size > 0, "chunk_size", f"must be > 0, got {self.chunk_size}")
        M = self.cache_size
        if self.policy == "streaming":
            _check(
                0 <= self.sink < M,
                "sink",
                f"needs 0 <= sink < cache_size ({M}), got {self.sink}",
            )
        if self.policy == "snapkv":
            _check(
                0 < self.snapkv_window < M,
                "snapkv_window",
                f"needs 0 < snapkv_window < cache_size ({M}), got {self.snapkv_window}",
            )
            _check(
                self.snapkv_kernel % 2 == 1 and self.snapkv_kernel >= 1,
                "snapkv_kernel",
                f"must be a positive odd number, got {self.snapkv_kernel}",
            )
            _check(
                self.snapkv_pooling in ("avg", "max"),
                "snapkv_pooling",
                f"must be 'avg' or 'max', got {self.snapkv_pooling!r}",
            )
        if self.policy == "h2o":
            _check(
                0 <= self.recent < M,
                "h2o_recent",
                f"needs 0 <= h2o_recent < cache_size ({M}), got {self.recent}",
            )
        if self.policy == "lococo":
            _check(
                0.0 < self.hh_keep_rate < 1.0,
                "hh_keep_rate",
                f"must be in (0, 1), got {self.hh_keep_rate}",
            )
            _check(
                self.num_fused >= 1,
                "cache_size",
                f"{M} leaves no fused slot at hh_keep_rate {self.hh_keep_rate}",
            )
            _check(
                0 <= self.local_len <= self.num_heavy,
                "local_len",
                f"needs 0 <= local_len <= heavy-hitter slots ({self.num_heavy}) for cache_size {M} "
                f"and hh_keep_rate {self.hh_keep_rate}, got {self.local_len}",
            )
            _check(
                self.kernel_size % 2 == 1 and self.kernel_size >= 1,
                "kernel_size",
                f"must be a positive odd number, got {self.kernel_size}",
            )
            n_rest = self.cache_size + self.chunk_size - self.num_heavy
            _check(
                self.kernel_size <= 2 * n_rest + 1,
                "kernel_size",
                f"{self.kernel_size} is larger than the {n_rest} positions it convolves over allow",
            )
            _check(self.n_convlayer >= 1, "n_convlayer", f"must be >= 1, got {self.n_convlayer}")
            _check(self.expand >= 1, "expand", f"must be >= 1, got {self.expand}")
            _check(self.activation in ACTIVATIONS, "activation", f"not in {ACTIVATIONS}")
            _check(
                self.normalizer in NORMALIZERS,
                "normalizer",
                f"{self.normalizer!r} not in {NORMALIZERS}",
            )
            lo_hi = (0.0, 1.0) if self.normalizer != "sigmoid" else (1e-6, 1.0 - 1e-6)
            _check(
                lo_hi[0] <= self.normalizer_init <= lo_hi[1],
                "normalizer_init",
                f"must be in [{lo_hi[0]}, {lo_hi[1]}] with normalizer {self.normalizer!r}, "
                f"got {self.normalizer_init}",
            )
            _check(
                self.conv_init in CONV_INITS,
                "conv_init",
                f"must be one of {CONV_INITS}, got {self.conv_init!r}",
            )
        _check(self.fusion_impl in FUSION_IMPLS, "fusion_impl", f"not in {FUSION_IMPLS}")
        _check(
            self.fusion_platform in (None, "cpu", "gpu", "tpu"),
            "fusion_platform",
            f"must be 'cpu', 'gpu', 'tpu' or null, got {self.fusion_platform!r}",
        )
        _check(
            not (self.fusion_impl == "pallas" and self.n_convlayer > 1),
            "fusion_impl",
            "the Pallas kernel fuses one conv layer; n_convlayer > 1 needs 'reference' or 'auto'",
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> CompressionConfig:
        """From a saved dict (a compressor file's metadata): unknown keys are an error naming
        ``source``; the legacy ``clip_normalizer`` (true: "clip", false: "official") becomes
        ``normalizer``."""
        d = dict(d)
        if "clip_normalizer" in d:
            legacy = d.pop("clip_normalizer")
            d.setdefault("normalizer", "clip" if legacy else "official")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        _check(not unknown, str(unknown), "unknown compression config field(s)", source)
        return cls(**d)

    @property
    def recent(self) -> int:
        return self.cache_size // 2 if self.h2o_recent is None else self.h2o_recent

    @property
    def num_fused(self) -> int:
        """C = floor(M * (1 - hh_keep_rate)) fused slots."""
        return int(self.cache_size * (1.0 - self.hh_keep_rate))

    @property
    def num_heavy(self) -> int:
        return self.cache_size - self.num_fused
