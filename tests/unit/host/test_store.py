"""The SQLite state file: the auto_created mark round-trips, and a file written before it
existed gains the column (its VMs read as operator-made, never taken over by name)."""

from __future__ import annotations

import pathlib
import sqlite3

import pytest

from host_service.store import PartitionRecord, StateStore

pytestmark = pytest.mark.unit

DIGEST = "0" * 64


def test_auto_created_round_trips(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.put_partition(PartitionRecord("a", "made", "linux", "running", DIGEST))
    store.put_partition(
        PartitionRecord("b", "auto", "windows", "running", DIGEST, auto_created=True)
    )
    store.close()
    again = StateStore(path)
    try:
        assert [(r.vm_id, r.auto_created) for r in again.partitions()] == [
            ("a", False),
            ("b", True),
        ]
    finally:
        again.close()


def test_a_file_from_before_auto_created_loads(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE partitions (vm_id TEXT PRIMARY KEY, name TEXT NOT NULL,"
        " personality TEXT NOT NULL, state TEXT NOT NULL, token_sha256 TEXT NOT NULL);"
        "CREATE TABLE services (service_id TEXT PRIMARY KEY, element_name TEXT NOT NULL);"
        f"INSERT INTO partitions VALUES ('old', 'a long old name', 'linux', 'running', '{DIGEST}');"
    )
    db.commit()
    db.close()
    store = StateStore(path)
    try:
        assert store.partitions() == [
            PartitionRecord("old", "a long old name", "linux", "running", DIGEST)
        ]
        store.put_partition(PartitionRecord("new", "n", "linux", "running", DIGEST, True))
        assert [r.auto_created for r in store.partitions()] == [False, True]
    finally:
        store.close()
