"""RULER offline: generation through the package's own scripts is deterministic per seed, the
sentence splitter that stands in for nltk's punkt splits as punkt would on plain cases, and the
scores are RULER's own metric functions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import eval_ruler  # noqa: E402


def _splitter():
    path = ROOT / "experiments" / "ruler_nltk" / "nltk" / "tokenize" / "__init__.py"
    spec = importlib.util.spec_from_file_location("ruler_sent_tokenize", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.sent_tokenize


@pytest.mark.parametrize(
    "text, want",
    [
        ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
        ("Mr. Smith paid $3.50 today. He left.", ["Mr. Smith paid $3.50 today.", "He left."]),
        ('He said "Stop." Then 1999 came.', ['He said "Stop."', "Then 1999 came."]),
        ("J. Doe wrote it, e.g. here. Done", ["J. Doe wrote it, e.g. here.", "Done"]),
        ("no capital. after it", ["no capital. after it"]),
    ],
)
def test_sentence_splitter(text, want):
    assert _splitter()(text) == want


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A tiny Hugging Face tokenizer folder (word level, whitespace + punctuation), so the
    generators' AutoTokenizer runs without the real model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    d = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(d)
    return d


@pytest.mark.slow
def test_generation_is_deterministic_per_seed(tmp_path, word_tokenizer):
    """niah_single_2: essay haystack, so the needles go between the splitter's sentences. The
    three generator runs (~20 s each: wonderwords' word lists) run side by side."""
    from concurrent.futures import ThreadPoolExecutor

    runs = [("a", 3), ("b", 3), ("c", 4)]
    with ThreadPoolExecutor(3) as pool:
        a, b, c = pool.map(
            lambda r: eval_ruler.generate(
                "niah_single_2", 1024, 2, r[1], word_tokenizer, tmp_path / f"{r[0]}.jsonl"
            ),
            runs,
        )
    assert a == b
    assert [s["outputs"] for s in a] != [s["outputs"] for s in c]
    for s in a:
        # The needle is in the haystack and the prompt ends with RULER's answer prefix.
        (value,) = s["outputs"]
        assert value.isdigit() and len(value) == 7
        assert f"is: {value}." in s["input"]
        assert s["input"].endswith("mentioned in the provided text is")
        assert s["length"] <= 1024
    assert json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0]) == a[0]


def test_chat_template_wraps_the_task_and_keeps_its_own_braces(tmp_path):
    """--template chat: the tokenizer's chat template around RULER's task template, answer prefix
    after the generation prompt; after both str.format calls (ours, then the generator's)
    the chat text's own braces are literal and the task's fields are filled."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
        unk_token="[UNK]",
    )
    tok.chat_template = (
        "{% for m in messages %}<u>{ {{ m['content'] }} }</u>{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    tok.save_pretrained(tmp_path)
    assert eval_ruler.model_template("chat", tmp_path) == "<u>{{{{ {task_template} }}}}</u><a>"
    config = eval_ruler.task_config("qa_1", "chat", tmp_path)
    filled = config["template"].format(context="DOCS", query="Q?")
    assert filled.startswith("<u>{ Answer the question based on the given documents.")
    assert "DOCS" in filled and "Question: Q? }</u><a> Answer:" in filled
    # RULER's plain template is the task template itself.
    base = eval_ruler.task_config("qa_1")["template"]
    assert base.startswith("Answer the question") and base.endswith("{query} Answer:")
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        eval_ruler.model_template("nope")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no chat template"):
        eval_ruler.model_template("chat", tmp_path / "plain")


def test_scores_are_rulers_string_match():
    refs = [["1234567"], ["1234567"], ["7654321"]]
    preds = [" 1234567.", "The number is 123456", "\x00 7654321\n"]
    total, per = eval_ruler.score("niah_single_1", preds, refs)
    assert per == [100.0, 0.0, 100.0]
    assert total == pytest.approx(66.67)
    # multi-value niah: string_match_all gives partial credit; qa: string_match_part, any of.
    total, _ = eval_ruler.score("niah_multivalue", ["11 and 22"], [["11", "22", "33", "44"]])
    assert total == 50.0
    total, _ = eval_ruler.score("qa_1", ["Paris, France"], [["London", "paris"]])
    assert total == 100.0


def _cell(task, policy, label_cfg, fraction, per_sample, samples=4):
    return {
        "key": "k",
        "task": task,
        "length": 2048,
        "policy": policy,
        "fraction": fraction,
        "cache_size": int(2048 * fraction) if fraction else 2100,
        "per_sample": per_sample,
        "score": sum(per_sample) / len(per_sample),
        "key_fields": {"samples": samples, "seed": 0, "config": label_cfg},
    }


def test_best_baseline_only_from_the_chosen_settings():
    from dataclasses import asdict

    from lococo_jax.config import CompressionConfig

    def cfg(policy, **kw):
        return asdict(CompressionConfig(policy=policy, cache_size=512, chunk_size=128, **kw))

    cells = [
        _cell("niah_single_1", "full", cfg("full"), None, [100.0] * 4),
        _cell("niah_single_1", "tova", cfg("tova"), 0.25, [100.0, 100.0, 0.0, 0.0]),
        _cell("niah_single_1", "keydiff", cfg("keydiff"), 0.25, [100.0, 0.0, 100.0, 0.0]),
        # a swept, not chosen, setting scores higher: it must not be named best
        _cell("niah_single_1", "h2o", cfg("h2o", h2o_recent=256), 0.25, [100.0] * 4),
        _cell("niah_single_1", "h2o", cfg("h2o", h2o_recent=128), 0.25, [0.0] * 4),
        _cell("niah_single_1", "tova", cfg("tova"), 0.125, [100.0] * 4),  # other fraction
    ]
    (row,) = eval_ruler.best_rows(cells, 0.25)
    assert [b[0] for b in row["best"]] == ["keydiff", "tova"]
    assert row["best"][0][1:] == pytest.approx((50.0, 28.8675))
    assert row["full"] == (100.0, 0.0)
    assert [c[0] for c in row["candidates"]][-1] == "h2o recent 1/4 M"
