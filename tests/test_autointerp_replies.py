"""Reading LLM replies: tolerant extraction of the 0/1 list, the explanation line, and the signs of
a model that cannot follow the format."""
from __future__ import annotations

import pytest

from moesae import autointerp as ai


@pytest.mark.parametrize("reply, expected", [
    ("Answer: [1, 0,1]", [True, False, True]),
    ("[1, 0] then [0, 0, 1]", [False, False, True]),           # the first list of the right length
    ('```json\n{"answers": [0, 1, 1]}\n```', [False, True, True]),  # response_format json_schema
    ('{"predictions": [1, 1, 0]}', [True, True, False]),
    ('["1", "0", "1"]', [True, False, True]),
    ("[true, false, True]", [True, False, True]),
    ("[yes, no, no]", [True, False, False]),
    ("Sure: [1 0 1]", [True, False, True]),
    ("[1, 1, 0", [True, True, False]),                         # cut before the closing bracket
    ("Example 1: 1\nExample 2: 0\nExample 3: 1", [True, False, True]),
    ("1. yes\n2. no\n3. no", [True, False, False]),
    ("1, 0, 0", [True, False, False]),
    (" 0 1 1 ", [False, True, True]),
])
def test_parse_judgements_is_tolerant(reply, expected):
    assert ai.parse_judgements(reply, 3) == expected


@pytest.mark.parametrize("reply", [
    "[1, 2, 0]", "[1, 0]", "", "Example 21:", "I think the first one is active.",
    "Example 1: the cat sat on 1\nExample 2: 0 dogs\nExample 3: 1",   # echoed excerpts are not answers
    "Example 1: 1\nExample 2: 0",                                  # one line missing
    '{"answers": [1, 0]}',
])
def test_parse_judgements_refuses_what_is_not_an_answer(reply):
    assert ai.parse_judgements(reply, 3) is None


def test_judgement_problem_says_what_is_wrong():
    assert ai.judgement_problem("", 3) == "it was empty"
    assert ai.judgement_problem("no idea", 3) == "it contained no list in square brackets"
    assert ai.judgement_problem("[1, 0]", 3) == "its list had 2 entries, not 3"
    assert ai.judgement_problem("[1, 2, 0]", 3) == "its list had entries other than 0 and 1"


def test_parse_explanation():
    assert ai.parse_explanation("Sure.\nExplanation: the word 'def'\nmore") == "the word 'def'"
    assert ai.parse_explanation("explanation:\n  numbers in lists") == "numbers in lists"
    assert ai.parse_explanation("  plain first line\nsecond") == "plain first line"
    assert ai.parse_explanation("") == ""


PROMPT = ('Answer with a single line that starts with "Explanation:" followed by at most 25 words.\n'
          "Example 1: def <<foo>>(x)\nActive tokens: \"foo\" (10)")


@pytest.mark.parametrize("raw, finish, problem", [
    ("", "stop", "empty"),
    ("Explanation: ...", "stop", "empty"),
    ("Example 21:", "stop", "scaffolding"),                    # the server ignored the stop sequence
    ("Active tokens: \"foo\" (10)", "stop", "scaffolding"),
    ('Explanation: "Explanation:" followed by at most 25 words.', "stop", "scaffolding"),  # echoes the prompt
    ("Explanation: the the the the the", "stop", "repetition"),
    ("Explanation: names of functions\n" + "The feature fires on names. " * 12, "length", "repetition"),
    ("def foo def bar class baz import", "length", "truncated"),   # ran to the limit, never answered
    ("Explanation: names of functions after def", "stop", None),
    ("Explanation: names of functions after def\nand some more words", "length", None),
    ("Function names right after the keyword def", "stop", None),
])
def test_explanation_problem(raw, finish, problem):
    assert ai.explanation_problem(raw, ai.parse_explanation(raw), finish, PROMPT) == problem


def test_an_explanation_may_quote_the_excerpts_but_not_copy_the_instructions():
    instructions = "Look for what the marked tokens have in common: the same token or word, a kind of word."
    assert ai.explanation_problem("Explanation: import numpy as np", "import numpy as np", "stop", instructions) is None
    assert ai.explanation_problem("Explanation: a kind of word", "a kind of word", "stop", instructions) == "scaffolding"


def test_is_repetitive():
    assert ai.is_repetitive("a b c a b c a b c")
    assert ai.is_repetitive("The same sentence here. The same sentence here. The same sentence here.")
    assert not ai.is_repetitive("opening brackets of function calls, especially after print")
    assert not ai.is_repetitive("very very good")


def test_cut_at_stop_and_redact_url():
    assert ai.cut_at_stop("Explanation: x\nExample 21: y", ["Example ", "Active tokens:"]) == "Explanation: x\n"
    assert ai.cut_at_stop("Example 21:", ["Example "]) == ""
    assert ai.cut_at_stop("abc", None) == "abc"
    assert ai.redact_url("https://user:pw@host:8000/v1") == "https://host:8000/v1"
    assert ai.redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_prompts_and_schema():
    assert ai.render_tokens([" a", " b", " c", " d"], [False, True, True, False]) == " a<< b c>> d"
    assert ai.render_tokens([" a", " b"], [False, True]) == " a<< b>>"
    for name in ("explain_system", "explain_user", "explain_retry", "detection_system", "detection_user",
                 "fuzzing_system", "fuzzing_user", "judgement_retry"):
        assert ai.load_prompt(name).template
    ai.load_prompt("judgement_retry").substitute(problem="p", count=3)
    ai.load_prompt("explain_retry").substitute(problem="p")
    schema = ai.judgement_schema(7)["json_schema"]["schema"]["properties"]["answers"]
    assert schema["minItems"] == schema["maxItems"] == 7 and schema["items"]["enum"] == [0, 1]
