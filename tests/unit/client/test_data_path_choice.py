"""The data path a partition is asked to use: "auto", "shm" or "relay" ("grpc" is deprecated)."""

from __future__ import annotations

import logging

import pytest

from guest_client._partition import DATA_PATHS, _data_path_choice

pytestmark = pytest.mark.unit


def test_the_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVSOCK_DATA_PATH", "shm")
    assert _data_path_choice("relay") == "relay"
    assert _data_path_choice(None) == "shm"
    monkeypatch.delenv("HVSOCK_DATA_PATH")
    assert _data_path_choice(None) == "auto"
    assert DATA_PATHS == ("auto", "shm", "relay")


def test_old_relay_name_still_works_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match='use "relay"'):
        assert _data_path_choice("grpc") == "relay"


def test_old_relay_name_in_the_environment_is_logged_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HVSOCK_DATA_PATH", "grpc")
    with (
        caplog.at_level(logging.WARNING, logger="hvsock.client"),
        pytest.warns(DeprecationWarning, match="HVSOCK_DATA_PATH="),
    ):
        assert _data_path_choice(None) == "relay"
    assert any('use "relay"' in r.getMessage() for r in caplog.records)


def test_anything_else_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVSOCK_DATA_PATH", "tcp")
    with pytest.raises(ValueError, match="auto, shm or relay, not 'tcp'"):
        _data_path_choice(None)
