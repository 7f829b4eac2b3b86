"""Lone UTF-16 surrogates in a JSON body: found with the path to their string, pairs and escaped text left alone."""

from __future__ import annotations

import pytest

from dualpath.http.unicode_check import lone_surrogate_path


@pytest.mark.parametrize(("body", "where"), [
    (rb'{"messages": [{"role": "user", "content": "\ud800 hi"}]}', "messages.0.content"),
    (rb'{"prompt": ["ok", "tail \uDFFF"]}', "prompt.1"),
    (rb'{"input": "\udc00"}', "input"),
    (rb'{"a": {"b": [1, {"c": "x\ud83d"}]}}', "a.b.1.c"),  # a high half with no low half after it
    (rb'{"logit_bias": {"\ud800": 1}}', "logit_bias.\\ud800"),  # in a key
    (rb'"\ud800"', ""),  # the whole body (the caller says "the body")
])
def test_lone_halves_are_found_with_their_path(body: bytes, where: str) -> None:
    assert lone_surrogate_path(body) == where


@pytest.mark.parametrize("body", [
    rb'{"content": "\ud83d\ude00 a pair is one emoji"}',
    rb'{"content": "plain text, \u00e9, \u4e2d"}',
    rb'{"content": "\\ud800 is text here: an escaped backslash, then ud800"}',
    b'{"content": "raw UTF-8 \xf0\x9f\x98\x80"}',
    rb'{"content": "\ud800',  # not JSON: validation names that
    b"",
])
def test_valid_text_and_non_json_pass(body: bytes) -> None:
    assert lone_surrogate_path(body) is None
