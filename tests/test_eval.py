"""minigpt eval: exact-match grading on known cases, perplexity of a uniform model,
greedy answers, the table, the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from chat_testing import make_base_run, tiny_model, tiny_tokenizer
from train_testing import one_thread

import minigpt.train.evaluate as ev
from minigpt.cli import main as cli_main
from minigpt.data.synthetic import TaskExample, answers_match

_one_thread = pytest.fixture(autouse=True)(one_thread)


def test_exact_match_on_known_cases(monkeypatch):
    examples = [
        TaskExample("add", "What is 2 + 2?", "4"),
        TaskExample("add", "What is 3 + 3?", "6"),
        TaskExample("reverse", "Reverse the words: a b", "b a"),
        TaskExample("reverse", "Reverse the words: c d", "d c"),
        TaskExample("qa", "Text: ...", "red"),
    ]
    answers = {"What is 2 + 2?": " 4\n", "What is 3 + 3?": "66", "Reverse the words: a b": "b a",
               "Reverse the words: c d": "d  c", "Text: ...": "Red"}  # fmt: skip
    monkeypatch.setattr(
        ev, "greedy_answers", lambda m, t, prompts, *a: [answers[p] for p in prompts]
    )
    r = ev.task_accuracy(None, None, examples)
    assert r["accuracy"] == pytest.approx(2 / 5)
    assert r["per_task"] == {"add": 0.5, "reverse": 0.5, "qa": 0.0}
    assert r["n"] == 5 and r["examples"][1]["prediction"] == "66"
    assert (
        answers_match("  4 ", "4") and not answers_match("4.", "4") and not answers_match("", "4")
    )
    with pytest.raises(ValueError, match="at least one example"):
        ev.task_accuracy(None, None, [])


def test_uniform_model_has_perplexity_equal_to_vocab():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embedding: every logit is 0
    r = ev.text_perplexity(model, tok, ["the cat sat on the mat. " * 20] * 3, max_tokens=300)
    assert r["perplexity"] == pytest.approx(tok.vocab_size, rel=1e-4)
    assert r["tokens"] == 300
    assert r["bits_per_byte"] > 0
    with pytest.raises(ValueError, match="no held-out text"):
        ev.text_perplexity(model, tok, [""], max_tokens=0)


def test_greedy_answers_stop_at_end_of_turn():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    end = tok.special_tokens["<|end|>"]
    head = torch.nn.Linear(model.config.d_model, tok.vocab_size)  # untied, with a bias
    with torch.no_grad():  # <|end|> is the most likely next token everywhere
        head.weight.zero_()
        head.bias.zero_()
        head.bias[end] = 10.0
    model.lm_head = head
    out = ev.greedy_answers(
        model, tok, ["What is 1 + 1?", "Reverse the words: a b c"], batch_size=1
    )
    assert out == ["", ""]  # stopped at once; the stop token is not part of the text


def test_format_table_and_cli(tmp_path, capsys):
    base = make_base_run(tmp_path / "base")
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--model", str(base), "--n", "2", "--tasks", "add", "qa",
                     "--out", str(out), "--threads", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| model | accuracy | add | qa |" in printed
    result = json.loads(out.read_text())[str(base)]
    assert result["tasks"]["n"] == 4 and set(result["tasks"]["per_task"]) == {"add", "qa"}
    assert 0.0 <= result["tasks"]["accuracy"] <= 1.0
    assert cli_main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "no model at" in capsys.readouterr().out
    table = ev.format_table(
        {
            "m": {
                "tasks": {"accuracy": 0.5, "per_task": {"add": 0.5}},
                "text": {"perplexity": math.e, "bits_per_byte": 1.0},
            }
        }
    )
    assert "| m | 50.0% | 50% | 2.72 | 1.000 |" in table
