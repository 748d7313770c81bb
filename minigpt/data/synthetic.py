"""Synthetic, verifiable instruction tasks that a small model can learn on a CPU.

Each task is a one-turn exchange whose answer is computed, not written, so it
can be graded by exact match and any number of examples can be made:

============  ==========================================================  ================
task          prompt                                                      answer
============  ==========================================================  ================
add           What is 23 + 17?                                            40
count         How many times does "cat" appear in: cat sun cat ox?       2
reverse       Reverse the words: red fox runs                             runs fox red
sort          Sort the words alphabetically: pear fig apple               apple fig pear
json_list     Write as a JSON list: red, blue                             ["red", "blue"]
qa            Text: Ann has a red fox and lives in Rome. ... color ...    red
============  ==========================================================  ================

**Held-out splits that never overlap.** Whether a prompt belongs to the
``"test"`` split is decided by a hash of its text (:func:`split_of`), not by
the random draw, so a test prompt can never be generated for ``"train"``,
whatever the seed or the number of examples. Generation is deterministic for
a given seed.

:func:`wrong_answer` makes a *plausible* wrong answer (an off-by-one sum, two
words swapped, a different color...), which is what the DPO stage uses as the
rejected reply.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("add", "count", "reverse", "sort", "json_list", "qa")


def _word_list(text: str) -> tuple[str, ...]:
    return tuple(text.split())


WORDS = _word_list(
    "apple bird boat book cake car cat cloud cup desk dog door egg fan fig fish "
    "frog hat hill jam key kite lamp leaf lion map moon nest owl pear pen pig rain "
    "ring rock rose salt ship shoe sock star sun tea tent tree van wolf"
)
NAMES = _word_list(
    "Ann Ben Cara Dan Eve Finn Gus Hana Ivan Jo Kim Leo Mia Ned Olga Pam Raj Sam Tia Zoe"
)
COLORS = _word_list("red blue green black white brown pink gray")
ANIMALS = _word_list("cat dog fox owl pig cow hen duck goat frog")
CITIES = _word_list("Rome Oslo Lima Cairo Paris Tokyo Delhi Quito Berlin Dakar")


@dataclass(frozen=True)
class TaskExample:
    """One generated task: its name, the user's prompt, and the exact answer."""

    task: str
    prompt: str
    answer: str

    def messages(self, answer: str | None = None) -> list[dict[str, str]]:
        """The exchange as chat messages (with ``answer`` instead of the true one if given)."""
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.answer if answer is None else answer},
        ]


def split_of(prompt: str, held_out_fraction: float = 0.1) -> str:
    """``"test"`` for about ``held_out_fraction`` of all prompts, else ``"train"``.

    A pure function of the prompt text (SHA-256), so the two splits are disjoint
    by construction.
    """
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2.0**64 < held_out_fraction else "train"


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def make_example(task: str, rng: random.Random) -> TaskExample:
    """Draw one example of ``task`` with ``rng``."""
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return TaskExample(task, f"What is {a} + {b}?", str(a + b))
    if task == "count":
        target = rng.choice(WORDS)
        others = _words(rng, 2, 5)
        seq = [w for w in others if w != target] + [target] * rng.randint(1, 3)
        rng.shuffle(seq)
        prompt = f'How many times does "{target}" appear in: {" ".join(seq)}?'
        return TaskExample(task, prompt, str(seq.count(target)))
    if task == "reverse":
        words = _words(rng, 3, 5)
        return TaskExample(task, f"Reverse the words: {' '.join(words)}", " ".join(words[::-1]))
    if task == "sort":
        words = _words(rng, 3, 5)
        prompt = f"Sort the words alphabetically: {' '.join(words)}"
        return TaskExample(task, prompt, " ".join(sorted(words)))
    if task == "json_list":
        words = _words(rng, 2, 4)
        return TaskExample(task, f"Write as a JSON list: {', '.join(words)}", json.dumps(words))
    if task == "qa":
        name, color = rng.choice(NAMES), rng.choice(COLORS)
        animal, city = rng.choice(ANIMALS), rng.choice(CITIES)
        text = f"{name} has a {color} {animal} and lives in {city}."
        question, answer = rng.choice(
            [
                (f"What color is the {animal} of {name}?", color),
                (f"Which animal does {name} have?", animal),
                (f"Where does {name} live?", city),
            ]
        )
        return TaskExample(task, f"Text: {text}\nQuestion: {question}", answer)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def generate_tasks(
    n: int,
    split: str = "train",
    *,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
    held_out_fraction: float = 0.1,
    unique: bool = True,
) -> list[TaskExample]:
    """``n`` examples of ``split`` ("train" or "test"), tasks in turn.

    Deterministic for a given (seed, tasks, held_out_fraction). With ``unique``
    every prompt is distinct, and a task that runs out of distinct prompts in
    the split (``add`` has 2,500 in all) raises ``ValueError``; without it,
    prompts may repeat (fine for training data).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not tasks:
        raise ValueError("tasks must name at least one task")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {TASKS}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    rng = random.Random(f"{seed}:{split}")
    out: list[TaskExample] = []
    seen: set[str] = set()
    for i in range(n):
        task = tasks[i % len(tasks)]
        for _ in range(10_000):
            ex = make_example(task, rng)
            if (not unique or ex.prompt not in seen) and split_of(
                ex.prompt, held_out_fraction
            ) == split:
                break
        else:
            raise ValueError(f"task {task!r} has no more distinct {split} prompts")
        if unique:
            seen.add(ex.prompt)
        out.append(ex)
    return out


def wrong_answer(example: TaskExample, rng: random.Random) -> str:
    """A plausible but wrong answer to ``example`` (never equal to the right one)."""
    a = example.answer
    for _ in range(100):
        wrong = _perturb(example, rng)
        if wrong != a and wrong.strip():
            return wrong
    return a + " " + a  # every task's answer is wrong when doubled


def _perturb(example: TaskExample, rng: random.Random) -> str:
    a, task = example.answer, example.task
    if task in ("add", "count"):
        return str(max(0, int(a) + rng.choice([-10, -2, -1, 1, 2, 10])))
    if task in ("reverse", "sort"):
        words = a.split()
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
        if rng.random() < 0.3:  # or the input order copied unchanged
            words = example.prompt.split(": ", 1)[1].split()
        return " ".join(words)
    if task == "json_list":
        words = json.loads(a)
        choice = rng.random()
        if choice < 0.4:
            return ", ".join(words)  # right words, wrong format
        if choice < 0.7:
            return json.dumps(words[::-1])
        return json.dumps(words[:-1])
    if task == "qa":
        pool = COLORS if a in COLORS else ANIMALS if a in ANIMALS else CITIES
        return rng.choice(pool)
    raise ValueError(f"unknown task {task!r}")


def answers_match(prediction: str, answer: str) -> bool:
    """Exact match, ignoring surrounding whitespace."""
    return prediction.strip() == answer.strip()


def tasks_as_conversations(examples: Sequence[TaskExample]) -> list[dict]:
    """``{"messages": [...], "task": ...}`` records (the conversation JSONL format)."""
    return [{"messages": e.messages(), "task": e.task} for e in examples]
