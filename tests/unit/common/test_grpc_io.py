"""gRPC's I/O stack is chosen around the first import of grpc, and only then, and only unasked."""

from __future__ import annotations

import os
import sys

import pytest

from hvsock_common import grpc_io

pytestmark = pytest.mark.unit


@pytest.fixture
def grpc_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a program that has not imported grpc yet (this process may have)."""
    monkeypatch.delitem(sys.modules, "grpc", raising=False)
    monkeypatch.setattr(grpc_io, "_chosen", False)
    monkeypatch.delenv(grpc_io.GRPC_ENV, raising=False)
    monkeypatch.delenv(grpc_io.ENV, raising=False)


@pytest.mark.usefixtures("grpc_not_loaded")
def test_the_pollers_are_chosen_for_the_import_only() -> None:
    with grpc_io.choosing() as chosen:
        assert chosen
        assert os.environ[grpc_io.GRPC_ENV] == grpc_io.EXPERIMENTS
    # The programs this process starts get the environment they would have had.
    assert grpc_io.GRPC_ENV not in os.environ
    assert grpc_io.stack() == "pollers"


@pytest.mark.usefixtures("grpc_not_loaded")
@pytest.mark.parametrize("value", ["pollers", ""])
def test_pollers_is_the_default(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(grpc_io.ENV, value)
    with grpc_io.choosing() as chosen:
        assert chosen


@pytest.mark.usefixtures("grpc_not_loaded")
def test_grpc_default_leaves_grpc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(grpc_io.ENV, "grpc-default")
    with grpc_io.choosing() as chosen:
        assert not chosen
        assert grpc_io.GRPC_ENV not in os.environ
    assert grpc_io.stack() == "grpc-default"


@pytest.mark.usefixtures("grpc_not_loaded")
@pytest.mark.parametrize("theirs", ["", "event_engine_client"])
def test_the_users_own_experiments_win(monkeypatch: pytest.MonkeyPatch, theirs: str) -> None:
    monkeypatch.setenv(grpc_io.GRPC_ENV, theirs)
    with grpc_io.choosing() as chosen:
        assert not chosen
    assert os.environ[grpc_io.GRPC_ENV] == theirs
    assert grpc_io.stack() == (f"GRPC_EXPERIMENTS={theirs}" if theirs else "grpc-default")


def test_once_grpc_is_loaded_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    import grpc  # noqa: F401 - loaded, as in most programs by now

    monkeypatch.delenv(grpc_io.GRPC_ENV, raising=False)
    with grpc_io.choosing() as chosen:
        assert not chosen
        assert grpc_io.GRPC_ENV not in os.environ


@pytest.mark.usefixtures("grpc_not_loaded")
def test_an_unknown_choice_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(grpc_io.ENV, "eventengine")
    refused = pytest.raises(ValueError, match="HVSOCK_GRPC_IO='eventengine': expected one of")
    with refused, grpc_io.choosing():
        pass
