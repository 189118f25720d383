"""Bad inputs, as a new user would try them: each row is the input (a command line, or a library
call), the error text it must give (one line, exit status 2, no traceback) or the note of a run
that must go on, and the files: nothing may be written or left behind (no temporaries).

Rows run in-process through cli.main on tiny models; the model loader is wrapped so a row can
also say that its input is refused before any model loads.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_hf

from lococo_jax import cli, convert

ROOT = Path(__file__).resolve().parents[1]
ASSET64 = ROOT / "lococo_jax" / "assets" / "compressors" / "smollm2-135m_M64_B128.safetensors"
TEXT = "It is a truth universally acknowledged, that a single man in possession of a fortune. " * 2


def _nan_norm(model) -> None:
    model.model.norm.weight[0] = float("nan")


def _hf_llama(folder: Path, nan: bool = False, **overrides) -> Path:
    return make_tiny_hf(folder, edit=_nan_norm if nan else None, **overrides)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bad_inputs")
    e = {
        "hf": _hf_llama(base / "hf"),
        "nan": _hf_llama(base / "nan", nan=True),
        # 30 layers, head_dim 64, 3 KV heads: the shapes of the committed SmolLM2 compressors
        "hf30": _hf_llama(
            base / "hf30",
            num_hidden_layers=30,
            hidden_size=192,
            intermediate_size=32,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=64,
        ),
    }
    e["conv"] = convert.convert(e["hf"], base / "converted")
    e["text"] = base / "doc.txt"
    e["text"].write_text(TEXT)
    return e


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    # argv with {hf} {nan} {hf30} {conv} {text} (module fixtures) and {tmp} (this row's folder),
    # or a callable(env, tmp) -> argv / None (a library call that must raise `raises`)
    argv: list[str] | Callable | None
    expect: str  # regex the one error line (or, with rc 0, stderr) must match
    rc: int = 2
    before_load: bool = True  # refused before any model loads
    raises: type | None = None  # library rows: the exception type
    setup: Callable | None = None  # setup(env, tmp): files the row needs (not "written" by it)


def damage(offset_frac: float, truncate: bool = False):
    """A copy of the converted checkpoint at {tmp}/ck with 4 KB of its largest file zeroed."""

    def setup(e, tmp):
        ck = tmp / "ck"
        shutil.copytree(e["conv"], ck)
        big = max((p for p in ck.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data = bytearray(big.read_bytes())
        if truncate:
            data = data[: len(data) // 2]
        else:
            at = int(len(data) * offset_frac)
            data[at : at + 4096] = b"\0" * len(data[at : at + 4096])
        big.write_bytes(bytes(data))

    return setup


def write(name: str, content: bytes):
    def setup(e, tmp):
        (tmp / name).write_bytes(content)

    return setup


def both(*setups):
    def setup(e, tmp):
        for s in setups:
            s(e, tmp)

    return setup


def core_overflow(e, tmp):
    """apply 3 tokens into a raw window of 8 that holds 6 (it used to overwrite entries)."""
    from lococo_jax import longctx, models
    from lococo_jax.config import CompressionConfig
    from lococo_jax.kv_state import init_state

    cfg, params, _ = models.load_model("tiny")
    ccfg = CompressionConfig(policy="streaming", cache_size=16, chunk_size=8)
    st = init_state(cfg, ccfg, 1)
    st = st.replace(win_len=jnp.int32(6), win_valid=jnp.array([6]), seen=jnp.array([6]))
    longctx.apply(params, jnp.ones((1, 3), jnp.int32), st, cfg, ccfg)


def core_full_chunk_on_window(e, tmp):
    from lococo_jax import longctx, models
    from lococo_jax.config import CompressionConfig
    from lococo_jax.kv_state import init_state

    cfg, params, _ = models.load_model("tiny")
    ccfg = CompressionConfig(policy="h2o", cache_size=16, chunk_size=8)
    st = init_state(cfg, ccfg, 1)
    st = st.replace(win_len=jnp.int32(2), win_valid=jnp.array([2]), seen=jnp.array([2]))
    longctx.apply(params, jnp.ones((1, 8), jnp.int32), st, cfg, ccfg)


def core_n_new(e, tmp):
    from lococo_jax import longctx, models
    from lococo_jax.config import CompressionConfig
    from lococo_jax.kv_state import init_state

    cfg, params, _ = models.load_model("tiny")
    ccfg = CompressionConfig(policy="h2o", cache_size=16, chunk_size=8)
    st = init_state(cfg, ccfg, 2)
    longctx.apply(params, jnp.ones((2, 2), jnp.int32), st, cfg, ccfg, n_new=jnp.array([3, 1]))


def core_ragged_sub_chunk(e, tmp):
    """n_new [1, 0] then [1, 1]: row 1 must equal its own full attention (it read padding)."""
    from lococo_jax import llama, longctx, models
    from lococo_jax.config import CompressionConfig
    from lococo_jax.kv_state import init_state

    cfg, params, _ = models.load_model("tiny")
    ccfg = CompressionConfig(policy="full", cache_size=16, chunk_size=8)
    st = init_state(cfg, ccfg, 2)
    _, st = longctx.apply(params, jnp.array([[5], [9]]), st, cfg, ccfg, n_new=jnp.array([1, 0]))
    out, _ = longctx.apply(params, jnp.array([[6], [7]]), st, cfg, ccfg, n_new=jnp.array([1, 1]))
    ref = llama.forward(params, jnp.array([[7]]), cfg)
    err = float(np.abs(np.asarray(out[1, 0]) - np.asarray(ref[0, 0])).max())
    if err > 1e-4:
        raise AssertionError(f"ragged sub-chunk row is off full attention by {err}")
    raise ValueError("ok: equal to full attention")  # the row's expected outcome


def first_run_cache_under_a_file(e, tmp):
    from lococo_jax import models

    models.load_default_model(cache_dir=tmp / "afile" / "cache")


def kill_convert(e, tmp):
    """SIGTERM a conversion while it writes; then the error row checks what is left."""
    code = (
        "import sys, time; from lococo_jax import convert\n"
        "def slow(folder, dst):\n"
        "    print('writing', flush=True); time.sleep(60)\n"
        "convert._copy_tokenizer = slow\n"
        "convert.convert(sys.argv[1], sys.argv[2])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(cli.__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(e["hf"]), str(tmp / "out")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    left = sorted(p.name for p in tmp.iterdir())
    if left:
        raise AssertionError(f"a killed conversion left {left}")
    raise ValueError("ok: nothing left")


def stale_temporary(e, tmp):
    """A SIGKILLed run's temporary folder: the next conversion to that place removes it."""
    (tmp / ".out.tmp-999999999-0123abcd" / "params").mkdir(parents=True)
    convert.convert(e["hf"], tmp / "out")
    left = sorted(p.name for p in tmp.iterdir())
    if left != ["out"]:
        raise AssertionError(f"after the next conversion: {left}")
    shutil.rmtree(tmp / "out")
    raise ValueError("ok: stale temporary removed")


PPL = ["perplexity", "--cache-size", "16", "--chunk-size", "8"]
GEN = ["generate", "--cache-size", "16", "--chunk-size", "8"]

CASES = [
    # ---- core: window bookkeeping (library calls)
    Case("apply-window-overflow", core_overflow, r"overflow", raises=ValueError),
    Case(
        "apply-full-chunk-on-window",
        core_full_chunk_on_window,
        r"empty raw window",
        raises=ValueError,
    ),
    Case("apply-n_new-out-of-range", core_n_new, r"n_new must be in \[0, 2\]", raises=ValueError),
    Case(
        "apply-ragged-sub-chunk",
        core_ragged_sub_chunk,
        r"ok: equal to full attention",
        raises=ValueError,
    ),
    # ---- perplexity inputs
    Case(
        "ppl-empty-file",
        [*PPL, "--model", "tiny", "--text-file", "{tmp}/e.txt"],
        r"is empty",
        setup=write("e.txt", b""),
    ),
    Case(
        "ppl-whitespace-file",
        [*PPL, "--model", "tiny", "--text-file", "{tmp}/e.txt"],
        r"is empty",
        setup=write("e.txt", b" \n\n\t"),
    ),
    Case(
        "ppl-one-token-file",
        [*PPL, "--model", "tiny", "--text-file", "{tmp}/one.txt"],
        r"1 token\(s\), at least 2",
        setup=write("one.txt", b"a"),
    ),
    Case(
        "ppl-one-token-file-hf-model",
        [*PPL, "--model", "{conv}", "--text-file", "{tmp}/one.txt"],
        r"one.txt: 1 token\(s\), at least 2",
        setup=write("one.txt", b"a"),
    ),
    Case(
        "ppl-binary-file",
        [*PPL, "--model", "tiny", "--text-file", "{tmp}/b.bin"],
        r"binary",
        setup=write("b.bin", bytes(range(256))),
    ),
    Case(
        "ppl-latin1-file",
        [*PPL, "--model", "tiny", "--text-file", "{tmp}/l.txt"],
        r"not UTF-8 text \(invalid byte 0xe9",
        setup=write("l.txt", "caf\xe9 au lait".encode("latin-1")),
    ),
    Case(
        "ppl-missing-file",
        [*PPL, "--model", "tiny", "--text-file", "{tmp}/nope.txt"],
        r"--text-file .*nope.txt: no such file",
    ),
    Case(
        "ppl-directory-as-file",
        [*PPL, "--model", "tiny", "--text-file", "{tmp}"],
        r"is a directory",
    ),
    Case(
        "ppl-max-tokens-0",
        [*PPL, "--model", "tiny", "--text-file", "{text}", "--max-tokens", "0"],
        r"--max-tokens must be >= 2, got 0",
    ),
    Case(
        "ppl-max-tokens-negative",
        [*PPL, "--model", "tiny", "--text-file", "{text}", "--max-tokens", "-1"],
        r"--max-tokens must be >= 2, got -1",
    ),
    Case(
        "ppl-max-tokens-1",
        [*PPL, "--model", "tiny", "--text-file", "{text}", "--max-tokens", "1"],
        r"--max-tokens must be >= 2, got 1",
    ),
    Case(
        "ppl-text-checked-before-model",
        [*PPL, "--model", "smollm2", "--text-file", "{tmp}/e.txt"],
        r"is empty",
        setup=write("e.txt", b""),
    ),
    Case(
        "ppl-rope-linear-0",
        [*PPL, "--model", "tiny", "--text-file", "{text}", "--rope-linear", "0"],
        r"--rope-linear must be a positive factor",
    ),
    Case(
        "ppl-rope-linear-nan",
        [*PPL, "--model", "tiny", "--text-file", "{text}", "--rope-linear", "nan"],
        r"--rope-linear must be a positive factor",
    ),
    Case(
        "ppl-cache-size-0",
        ["perplexity", "--model", "tiny", "--text-file", "{text}", "--cache-size", "0"],
        r"cache_size.*must be > 0",
    ),
    Case(
        "ppl-chunk-size-negative",
        ["perplexity", "--model", "tiny", "--text-file", "{text}", "--chunk-size", "-4"],
        r"chunk_size",
    ),
    Case(
        "ppl-nan-weights",
        [*PPL, "--model", "{nan}", "--text-file", "{text}", "--policy", "h2o"],
        r"perplexity of .* is not finite",
        before_load=False,
    ),
    Case(
        "ppl-damaged-checkpoint",
        [*PPL, "--model", "{tmp}/ck", "--text-file", "{text}"],
        r"ck/.*: damaged",
        before_load=False,
        setup=damage(0.5),
    ),
    Case(
        "ppl-truncated-shard",
        [*PPL, "--model", "{tmp}/ck", "--text-file", "{text}"],
        r"ck/.*: damaged",
        before_load=False,
        setup=damage(0.0, truncate=True),
    ),
    Case(
        "ppl-chunk-covers-input",
        [
            "perplexity",
            "--model",
            "tiny",
            "--text-file",
            "{text}",
            "--policy",
            "h2o",
            "--cache-size",
            "16",
            "--chunk-size",
            "512",
        ],
        r"nothing is compressed",
        rc=0,
        before_load=False,
    ),
    # ---- model specs
    Case(
        "model-missing",
        [*PPL, "--model", "{tmp}/nowhere", "--text-file", "{text}"],
        r"--model .*nowhere.*: no such file or directory",
    ),
    Case(
        "model-not-gguf-file",
        [*PPL, "--model", "{text}", "--text-file", "{text}"],
        r"must be a \.gguf",
    ),
    Case(
        "model-empty-folder",
        [*PPL, "--model", "{tmp}/d", "--text-file", "{text}"],
        r"not a converted lococo_jax checkpoint",
        before_load=False,
        setup=lambda e, t: (t / "d").mkdir(),
    ),
    Case(
        "model-garbage-gguf",
        [*PPL, "--model", "{tmp}/m.gguf", "--text-file", "{text}"],
        r"m.gguf: not a readable GGUF file",
        before_load=False,
        setup=write("m.gguf", b"GGUF" + b"\0" * 64),
    ),
    Case(
        "policy-unknown",
        [*PPL, "--model", "tiny", "--text-file", "{text}", "--policy", "nope"],
        r"invalid choice: 'nope'",
    ),
    # ---- compressors bound to their model
    Case(
        "compressors-with-h2o",
        [
            *PPL,
            "--model",
            "tiny",
            "--text-file",
            "{text}",
            "--policy",
            "h2o",
            "--compressors",
            str(ASSET64),
        ],
        r"policy 'h2o' has no compressors",
    ),
    Case(
        "compressors-missing-path-with-streaming",
        [
            *PPL,
            "--model",
            "tiny",
            "--text-file",
            "{text}",
            "--policy",
            "streaming",
            "--compressors",
            "{tmp}/nope.safetensors",
        ],
        r"policy 'streaming' has no compressors",
    ),
    Case(
        "compressors-missing-path",
        [
            *PPL,
            "--model",
            "tiny",
            "--text-file",
            "{text}",
            "--compressors",
            "{tmp}/nope.safetensors",
        ],
        r"--compressors .*nope.safetensors: no such file",
    ),
    Case(
        "compressors-garbage-file",
        [*PPL, "--model", "tiny", "--text-file", "{text}", "--compressors", "{tmp}/c.safetensors"],
        r"c.safetensors: not a readable compressor file",
        before_load=False,
        setup=write("c.safetensors", b"\x08\0\0\0\0\0\0\0{}garbage"),
    ),
    Case(
        "committed-compressors-on-tiny-hf",
        [
            "perplexity",
            "--model",
            "{hf}",
            "--text-file",
            "{text}",
            "--cache-size",
            "64",
            "--chunk-size",
            "128",
        ],
        r"untrained random init",
        rc=0,
        before_load=False,
    ),
    Case(
        "committed-compressors-on-30-layer-model",
        [
            "perplexity",
            "--model",
            "{hf30}",
            "--text-file",
            "{text}",
            "--cache-size",
            "64",
            "--chunk-size",
            "128",
            "--max-tokens",
            "40",
        ],
        r"untrained random init",
        rc=0,
        before_load=False,
    ),
    Case(
        "committed-compressors-forced-on-30-layer-model",
        [
            "perplexity",
            "--model",
            "{hf30}",
            "--text-file",
            "{text}",
            "--cache-size",
            "64",
            "--chunk-size",
            "128",
            "--compressors",
            str(ASSET64),
        ],
        r"trained for another model \(llama layers=30 hidden=576.*not this one \(llama "
        r"layers=30 hidden=192",
        before_load=False,
    ),
    Case(
        "compressors-wrong-cache-size",
        [
            "perplexity",
            "--model",
            "{hf30}",
            "--text-file",
            "{text}",
            "--cache-size",
            "32",
            "--chunk-size",
            "128",
            "--compressors",
            str(ASSET64),
        ],
        r"trained for another model|trained for cache_size=64",
        before_load=False,
    ),
    # ---- generate
    Case(
        "gen-max-new-tokens-negative",
        [*GEN, "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "-1"],
        r"max_new_tokens must be >= 0",
    ),
    Case(
        "gen-runs-past-positions",
        [*GEN, "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "1000000000"],
        r"needs 1000000002 positions, past the model's 256.*--past-positions",
        before_load=False,
    ),
    Case(
        "gen-full-cache-too-big",
        [
            *GEN,
            "--model",
            "tiny",
            "--prompt",
            "hi",
            "--policy",
            "full",
            "--max-new-tokens",
            "100000000000",
            "--past-positions",
        ],
        r"policy 'full' keeps all .* GiB",
        before_load=False,
    ),
    Case("gen-empty-prompt", [*GEN, "--model", "tiny", "--prompt", ""], r"--prompt is empty"),
    Case(
        "gen-binary-prompt-file",
        [*GEN, "--model", "tiny", "--prompt-file", "{tmp}/b.bin"],
        r"binary",
        setup=write("b.bin", b"\0\1\2"),
    ),
    Case(
        "gen-temperature-negative",
        [*GEN, "--model", "tiny", "--prompt", "hi", "--temperature", "-1"],
        r"temperature must be >= 0",
    ),
    Case(
        "gen-top-p-0",
        [*GEN, "--model", "tiny", "--prompt", "hi", "--top-p", "0"],
        r"top_p must be in \(0, 1\]",
    ),
    Case(
        "gen-top-p-above-1",
        [*GEN, "--model", "tiny", "--prompt", "hi", "--top-p", "1.5"],
        r"top_p must be in \(0, 1\]",
    ),
    Case("gen-no-prompt", [*GEN, "--model", "tiny"], r"one of the arguments --prompt"),
    # ---- demo
    Case("demo-tokens-1", ["demo", "--model", "tiny", "--tokens", "1"], r"--tokens must be >= 2"),
    Case(
        "demo-missing-doc",
        ["demo", "--model", "tiny", "--doc", "{tmp}/nope.txt"],
        r"--doc .*nope.txt: no such file",
    ),
    # ---- convert
    Case(
        "convert-existing-destination",
        ["convert", "{hf}", "{tmp}/dst"],
        r"already exists: .*dst \(pass --overwrite",
        setup=lambda e, t: (t / "dst").mkdir(),
    ),
    Case(
        "convert-destination-under-a-file",
        ["convert", "{hf}", "{tmp}/afile/dst"],
        r"afile is a file, not a folder",
        setup=write("afile", b"x"),
    ),
    Case(
        "convert-overwrite-a-non-checkpoint",
        ["convert", "{hf}", "{tmp}/d", "--overwrite"],
        r"not a converted checkpoint",
        setup=lambda e, t: ((t / "d").mkdir(), (t / "d" / "mine.txt").write_text("keep")),
    ),
    Case(
        "convert-onto-its-source",
        ["convert", "{tmp}/hf", "{tmp}/hf", "--overwrite"],
        r"would replace the source",
        setup=lambda e, t: shutil.copytree(e["hf"], t / "hf"),
    ),
    Case(
        "convert-missing-source",
        ["convert", "{tmp}/nope", "{tmp}/dst"],
        r"source .*nope: no such file or directory",
    ),
    Case(
        "convert-text-file-source",
        ["convert", "{text}", "{tmp}/dst"],
        r"expected an HF checkpoint folder or a .gguf file",
    ),
    Case(
        "convert-garbage-gguf",
        ["convert", "{tmp}/m.gguf", "{tmp}/dst"],
        r"m.gguf: not a readable GGUF file",
        setup=write("m.gguf", b"GGUF" + b"\0" * 64),
    ),
    Case(
        "convert-folder-without-weights",
        ["convert", "{tmp}/d", "{tmp}/dst"],
        r"config.json|no weights",
        setup=lambda e, t: (t / "d").mkdir(),
    ),
    Case("convert-killed", kill_convert, r"ok: nothing left", raises=ValueError),
    Case(
        "convert-stale-temporary",
        stale_temporary,
        r"ok: stale temporary removed",
        raises=ValueError,
    ),
    Case(
        "first-run-cache-under-a-file",
        first_run_cache_under_a_file,
        r"afile is a file, not a folder",
        raises=NotADirectoryError,
        setup=write("afile", b"x"),
    ),
]


def _files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCOCO_CACHE", str(tmp_path / "never_used_cache"))
    if case.setup is not None:
        case.setup(env, tmp_path)
    capsys.readouterr()
    before = _files(tmp_path)
    loads = []
    real_load = cli.load_model
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    if case.raises is not None:
        with pytest.raises(case.raises, match=case.expect):
            case.argv(env, tmp_path)
        if case.name.startswith("convert-"):
            return  # those rows check their folder themselves
    else:
        fmt = {k: str(v) for k, v in env.items()} | {"tmp": str(tmp_path)}
        argv = [a.format(**fmt) for a in case.argv]
        try:
            cli.main(argv)
            rc = 0
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == case.rc, f"exit status {rc!r}, stderr:\n{err}"
        if case.rc:
            notes = ("note:", "warning:")
            lines = [
                ln
                for ln in err.splitlines()
                if ln.strip() and not ln.startswith(notes) and not re.search(r"\d+/\d+ \[", ln)
            ]  # progress bars aside
            assert "Traceback" not in err
            assert len(lines) == 1 or "usage:" in err, f"not one line:\n{err}"
            assert re.search(case.expect, lines[-1]), lines[-1]
        else:
            assert re.search(case.expect, err), err
        if case.before_load:
            assert loads == [], "the model was loaded before the input was refused"
    after = _files(tmp_path)
    assert after == before, f"files written or left behind: {set(after) ^ set(before)}"
