"""`TextStream` (server/generation.py): generated ids -> streamed text deltas, cut at the first stop string.

Specified against plain string operations on the whole text, with a byte-level tokenizer (one
token per UTF-8 byte) so that multi-byte characters arrive split over several tokens:
  - the deltas, joined, are the decoded text up to the first stop string to appear (exclusive), or
    the whole text when none does;
  - no delta ever carries a replacement character for a character still arriving, nor any text
    that a later token turns into (part of) a stop string.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (the test extra)")
from hypothesis import given, settings, strategies as st  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from expertmesh.server.generation import TextStream  # noqa: E402


def byte_tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


TOKENIZER = byte_tokenizer()


def stream(text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    ids = TOKENIZER.encode(text).ids
    s = TextStream(TOKENIZER, stops)
    deltas = []
    for i, token in enumerate(ids):
        deltas.append(s.add(token, last=i == len(ids) - 1))
        if s.stopped:
            break
    return deltas, s


def expected(text: str, stops: list[str]) -> str:
    """Generation ends as soon as some stop string has appeared (a longer stop that would have
    started earlier never gets the chance to complete), and the text ends where it begins."""
    for k in range(1, len(text) + 1):
        hits = [i for i in (text[:k].find(s) for s in stops) if i >= 0]
        if hits:
            return text[:min(hits)]
    return text


# Characters of 1 to 4 UTF-8 bytes; U+FFFD itself excluded (it is what a split character decodes to).
chars = st.sampled_from(list("ab z.\n") + ["é", "ß", "中", "文", "😀", "🎉"])
texts = st.lists(chars, min_size=1, max_size=24).map("".join)


def test_the_byte_tokenizer_splits_characters():
    """The premise of the properties below: a 4-byte character arrives as 4 tokens."""
    ids = TOKENIZER.encode("😀").ids
    assert len(ids) == 4 and TOKENIZER.decode(ids[:2]) == "\ufffd"


@settings(max_examples=150, deadline=None)
@given(texts)
def test_deltas_join_to_the_text_and_never_show_a_split_character(text):
    deltas, s = stream(text, [])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert not s.stopped


@settings(max_examples=200, deadline=None)
@given(texts, st.data())
def test_the_text_ends_before_the_first_stop_string(text, data):
    """Stops drawn from the text itself (so they occur, often across token and character
    boundaries) and from elsewhere (so some never do)."""
    n_stops = data.draw(st.integers(1, 3))
    stops = []
    for _ in range(n_stops):
        if data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(text) - 1))
            stops.append(text[i:data.draw(st.integers(i + 1, len(text)))])
        else:
            stops.append(data.draw(texts))
    deltas, s = stream(text, stops)
    want = expected(text, stops)
    assert "".join(deltas) == want
    assert s.stopped == any(stop in text for stop in stops)  # the first to complete ends it
    assert not any("\ufffd" in d for d in deltas)


def test_text_that_may_become_a_stop_string_is_held_back_and_no_more():
    """With a stop of length 3, the last 2 characters wait (they may start it), the rest goes out."""
    s = TextStream(TOKENIZER, ["abc"])
    out = [s.add(t, last=False) for t in TOKENIZER.encode("xab").ids]
    assert "".join(out) == "x"
    assert s.add(TOKENIZER.encode("d").ids[0], last=False) == "a"
    assert s.add(TOKENIZER.encode("e").ids[0], last=False) == "b"
    assert not s.stopped


def test_a_stop_string_at_the_start_gives_no_text():
    deltas, s = stream("stop here", ["stop"])
    assert "".join(deltas) == "" and s.stopped


def test_the_last_token_flushes_what_was_held():
    s = TextStream(TOKENIZER, ["abc"])
    ids = TOKENIZER.encode("xab").ids
    out = [s.add(t, last=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(out) == "xab" and not s.stopped


def test_without_a_tokenizer_there_is_no_text_but_the_ids_are_kept():
    s = TextStream(None, ["a"])
    assert [s.add(t, last=False) for t in (5, 6)] == ["", ""]
    assert s.ids == [5, 6]
