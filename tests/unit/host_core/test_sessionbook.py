"""What an attach session waits for (host_service.core.sessionbook): answers owed, auto-accept
credit and its bounds."""

from __future__ import annotations

import pytest

from host_service.core.errors import InvalidState, NotFound
from host_service.core.sessionbook import MAX_ACCEPT_CREDIT, OpenPlan, SessionBook

pytestmark = pytest.mark.unit


def test_one_answer_per_channel() -> None:
    book = SessionBook()
    plan = OpenPlan(request_id=4, force_relay=True, relay_window=0)
    book.expect(9, plan, connecting=True)
    with pytest.raises(InvalidState):
        book.expect(9, plan, connecting=True)
    assert book.opened(9, connector=False) is None  # the acceptor's end was not asked for
    assert book.opened(9, connector=True) == plan
    assert book.opened(9, connector=True) is None  # answered once


def test_failed_connect_is_owed_its_error() -> None:
    book = SessionBook()
    book.expect(3, OpenPlan(request_id=1), connecting=True)
    book.expect(4, OpenPlan(request_id=2), connecting=False)
    assert book.failed(3) == OpenPlan(request_id=1)
    assert book.failed(4) is None  # an accept is answered by its opening or its error
    assert not book.accepts and not book.connects


def test_auto_accept_credit_is_taken_returned_and_bounded() -> None:
    book = SessionBook()
    book.listen(5, 2, 1234)
    first = book.take_credit(5, 100)
    assert first == OpenPlan(relay_window=1234, listener_id=5)
    assert book.take_credit(5, 100) is None  # that channel is being accepted already
    assert book.take_credit(5, 101) is not None
    assert book.take_credit(5, 102) is None  # no credit left: offer it
    book.return_credit(101)
    assert book.credit(5) == 1
    book.add_credit(5, 10**9)
    assert book.credit(5) == MAX_ACCEPT_CREDIT
    with pytest.raises(NotFound):
        book.add_credit(6, 1)
    book.unlisten(5)
    assert book.take_credit(5, 103) is None and book.credit(5) == 0


def test_listen_without_auto_accept_has_no_credit() -> None:
    book = SessionBook()
    book.listen(5, 0, None)
    with pytest.raises(NotFound):
        book.add_credit(5, 1)


def test_forget() -> None:
    book = SessionBook()
    book.expect(3, OpenPlan(), connecting=True)
    book.closed.add(3)
    book.forget(3)
    assert not book.connects and not book.closed
