"""The command line on a tiny Hugging Face Llama with a character-level tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from lococo_jax import cli
from lococo_jax.tokenizer import load_tokenizer

TEXT = "It is a truth universally acknowledged, that a single man in possession of a fortune. " * 3


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "hf"
    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(
        folder
    )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=None,
        bos_token_id=None,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_convert_generate_perplexity(tiny_hf, tmp_path, capsys):
    dst = tmp_path / "converted"
    cli.main(["convert", str(tiny_hf), str(dst)])
    assert (dst / "config.json").exists()
    capsys.readouterr()

    cli.main(
        [
            "generate",
            "--model",
            str(dst),
            "--policy",
            "h2o",
            "--cache-size",
            "16",
            "--chunk-size",
            "8",
            "--prompt",
            TEXT,
            "--max-new-tokens",
            "6",
        ]
    )
    out = capsys.readouterr()
    n = len(load_tokenizer(dst).encode(TEXT, add_special_tokens=False))
    assert n > 200
    assert f"[h2o M=16 B=8] prompt {n} tokens" in out.err and "6 new tokens" in out.err

    prompt = tmp_path / "doc.txt"
    prompt.write_text(TEXT)
    rows = {}
    for policy in ("full", "streaming"):
        cli.main(
            [
                "perplexity",
                "--model",
                str(dst),
                "--policy",
                policy,
                "--cache-size",
                "16",
                "--chunk-size",
                "8",
                "--text-file",
                str(prompt),
            ]
        )
        rows[policy] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows["full"]["tokens"] == rows["streaming"]["tokens"] == n
    assert rows["full"]["cache_size"] == n  # full keeps every token
    # A random model is near-uniform over 128 ids; compression changes the numbers a little.
    for r in rows.values():
        assert 64 < r["perplexity"] < 256
    assert not np.isclose(rows["full"]["perplexity"], rows["streaming"]["perplexity"], rtol=1e-6)


def test_cli_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        cli.main(["generate", "--model", str(tmp_path / "no_such_model"), "--prompt", "hi"])
    with pytest.raises(SystemExit):
        cli.main(["generate", "--policy", "nope", "--prompt", "hi"])
