"""The command line on a tiny Hugging Face Llama with a character-level tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tiny_hf

from lococo_jax import cli
from lococo_jax.tokenizer import load_tokenizer

TEXT = "It is a truth universally acknowledged, that a single man in possession of a fortune. " * 3


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("cli") / "hf")


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
            "--past-positions",  # the prompt is longer than the model's 256 positions
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


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", str(tmp_path / "no_such_model"), "--prompt", "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and "no_such_model" in err and "Traceback" not in err
    with pytest.raises(Exception, match="no_such_model"):  # --debug: the exception itself
        cli.main(
            ["generate", "--debug", "--model", str(tmp_path / "no_such_model"), "--prompt", "hi"]
        )
    with pytest.raises(SystemExit):
        cli.main(["generate", "--policy", "nope", "--prompt", "hi"])


def test_help_shows_defaults_and_describes_every_argument():
    parser = cli.build_parser()
    subs = parser._subparsers._group_actions[0].choices
    for name, sub in subs.items():
        text = sub.format_help()
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if name != "convert":
            assert "(default: 128)" in text and "(default: smollm2)" in text, name
