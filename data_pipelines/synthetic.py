"""The embedded demo task: arithmetic questions whose answers can be checked exactly.

Needs no files or network, and serves every stage of the lifecycle:

    text_document(i)  pretraining text:  "12 + 34 = 46\\nWhat is 7 minus 9? -2\\n..."
    dialogue(i)       chat for SFT:      user "What is 12 + 34?" -> assistant "46" (1-3 turns)
    answer_pair(i)    preference pairs:  the same prompt, chosen "46", rejected "47"

Problems are a op b with a in [0, 99], b in [0, 9] and op in {+, -}: digit-level arithmetic
with one carry or borrow, which a model of a few hundred thousand parameters learns on a CPU
in minutes (two-digit second operands need far longer; measured in the SFT note). A fixed 10% of all problems (by a
hash of the problem) is held out: the validation split only ever uses held-out problems and
the train split never does, so validation accuracy measures arithmetic, not memory. Every
generator is a pure function of (index, split, seed).
"""

import dataclasses
import hashlib
import random
import re

# task -> the record kind it produces (data_pipelines/records.py): the same problems as
# pretraining text, as chat turns for SFT, and as right/wrong answer pairs for preference tuning.
TASKS = {"arithmetic": "text", "arithmetic_chat": "chat", "arithmetic_pairs": "preference"}
MAX_FIRST, MAX_SECOND = 99, 9
VERSION = 2  # bump when what the generators produce changes (prepared caches are keyed on it)
HELD_OUT_PERCENT = 10
SYSTEM_PROMPT = "You are a careful calculator. Answer with the number only."
_WORDS = {"+": "plus", "-": "minus"}
_QUESTION = re.compile(r"(-?\d+)\s*(\+|-|plus|minus)\s*(-?\d+)")
_INTEGER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    op: str  # "+" or "-"
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def held_out(self) -> bool:
        digest = hashlib.blake2b(f"{self.a}{self.op}{self.b}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % 100 < HELD_OUT_PERCENT


def _rng(kind: str, index: int, split: str, seed: int) -> random.Random:
    return random.Random(f"{kind}:{seed}:{split}:{index}")


def sample_problem(rng: random.Random, split: str) -> Problem:
    """A uniformly drawn problem from the split's side of the held-out line."""
    want_held_out = split != "train"
    while True:
        p = Problem(rng.randint(0, MAX_FIRST), rng.choice("+-"), rng.randint(0, MAX_SECOND))
        if p.held_out == want_held_out:
            return p


def _sentence(p: Problem, rng: random.Random) -> str:
    form = rng.randrange(4)
    if form == 0:
        return f"{p.a} {p.op} {p.b} = {p.answer}"
    if form == 1:
        return f"{p.question()} {p.answer}"
    if form == 2:
        return f"{p.a} {_WORDS[p.op]} {p.b} is {p.answer}."
    return f"Q: {p.question()} A: {p.answer}"


def record(task: str, index: int, split: str = "train", seed: int = 0) -> dict:
    """Record `index` of a task, in its kind's schema (messages as lists)."""
    if task == "arithmetic":
        return {"text": text_document(index, split, seed)}
    if task == "arithmetic_chat":
        return {"messages": dialogue(index, split, seed)}
    return answer_pair(index, split, seed)


def text_document(index: int, split: str = "train", seed: int = 0) -> str:
    """A pretraining document: 4 to 8 solved problems in mixed surface forms, one per line."""
    rng = _rng("text", index, split, seed)
    return "\n".join(_sentence(sample_problem(rng, split), rng) for _ in range(rng.randint(4, 8)))


def dialogue(index: int, split: str = "train", seed: int = 0) -> list[dict[str, str]]:
    """A chat of 1 to 3 question/answer turns, with the system prompt half of the time."""
    rng = _rng("dialogue", index, split, seed)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        p = sample_problem(rng, split)
        messages.append({"role": "user", "content": p.question()})
        messages.append({"role": "assistant", "content": str(p.answer)})
    return messages


def wrong_answer(p: Problem, rng: random.Random) -> int:
    """A plausible mistake: off by one or ten, or the other operation's result."""
    other = p.a - p.b if p.op == "+" else p.a + p.b
    choices = [p.answer + 1, p.answer - 1, p.answer + 10, p.answer - 10, other]
    return rng.choice([c for c in choices if c != p.answer])


def answer_pair(index: int, split: str = "train", seed: int = 0) -> dict:
    """{"prompt": messages ending with the user's question, "chosen": str, "rejected": str}."""
    rng = _rng("pair", index, split, seed)
    p = sample_problem(rng, split)
    prompt = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
    prompt.append({"role": "user", "content": p.question()})
    return {"prompt": prompt, "chosen": str(p.answer), "rejected": str(wrong_answer(p, rng))}


def parse_question(text: str) -> Problem | None:
    """The problem asked in `text` ("What is 12 + 34?"), or None."""
    m = _QUESTION.search(text)
    if not m:
        return None
    op = {"plus": "+", "minus": "-"}.get(m.group(2), m.group(2))
    return Problem(int(m.group(1)), op, int(m.group(3)))


def check_answer(question: str, reply: str) -> bool:
    """Exact match: the first integer in the reply equals the question's answer."""
    problem = parse_question(question)
    got = _INTEGER.search(reply)
    return problem is not None and got is not None and int(got.group()) == problem.answer
