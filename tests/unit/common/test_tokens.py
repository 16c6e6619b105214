"""Generated tokens can be passed on a command line as they are."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from hvsock_common import conventions

pytestmark = pytest.mark.unit


def test_a_token_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # secrets.token_urlsafe draws a leading "-" one time in 64: the first draws here do.
    draws: Iterator[str] = iter(["-first", "-second", "third"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda nbytes: next(draws))
    assert conventions.new_token() == "third"


def test_a_token_has_the_randomness_asked_for() -> None:
    token = conventions.new_token(16)
    assert len(token) == len(secrets.token_urlsafe(16)) and not token.startswith("-")
