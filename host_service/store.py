"""SQLite persistence of what must survive a restart: VM partitions, their tokens, services.

Channels and listeners are never persisted: a restarted host has none, as a rebooted Hyper-V
host has none. Tokens are kept only as SHA-256 hashes (as the core keeps them); the file is
still created with mode 0600.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sqlite3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS partitions (
    vm_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    personality TEXT NOT NULL,
    state TEXT NOT NULL,
    token_sha256 TEXT NOT NULL,
    auto_created INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS services (
    service_id TEXT PRIMARY KEY,
    element_name TEXT NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class PartitionRecord:
    vm_id: str
    name: str
    personality: str
    state: str
    token_sha256: str
    #: Created by an anonymous attach: the only kind a later attach may take over by name.
    auto_created: bool = False


@dataclasses.dataclass(frozen=True)
class ServiceRecord:
    service_id: str
    element_name: str


class StateStore:
    """One SQLite file; every write is its own committed transaction."""

    def __init__(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file 0600 before SQLite opens it, so no other user can ever read it.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(partitions)")}
        if "auto_created" not in columns:
            # A file from before auto_created: its VMs count as operator-made (never taken
            # over by name), the safe reading of a fact that was not recorded.
            self._db.execute(
                "ALTER TABLE partitions ADD COLUMN auto_created INTEGER NOT NULL DEFAULT 0"
            )

    def close(self) -> None:
        self._db.close()

    def partitions(self) -> list[PartitionRecord]:
        rows = self._db.execute(
            "SELECT vm_id, name, personality, state, token_sha256, auto_created"
            " FROM partitions ORDER BY rowid"
        )
        return [
            PartitionRecord(vm_id, name, personality, state, digest, auto_created=bool(auto))
            for vm_id, name, personality, state, digest, auto in rows
        ]

    def services(self) -> list[ServiceRecord]:
        rows = self._db.execute("SELECT service_id, element_name FROM services ORDER BY rowid")
        return [ServiceRecord(*row) for row in rows]

    def put_partition(self, record: PartitionRecord) -> None:
        self._db.execute(
            "INSERT INTO partitions (vm_id, name, personality, state, token_sha256,"
            " auto_created) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(vm_id) DO UPDATE SET"
            " name=excluded.name, personality=excluded.personality, state=excluded.state,"
            " token_sha256=excluded.token_sha256, auto_created=excluded.auto_created",
            (*dataclasses.astuple(record)[:5], int(record.auto_created)),
        )

    def set_partition_state(self, vm_id: str, state: str) -> None:
        self._db.execute("UPDATE partitions SET state = ? WHERE vm_id = ?", (state, vm_id))

    def delete_partition(self, vm_id: str) -> None:
        self._db.execute("DELETE FROM partitions WHERE vm_id = ?", (vm_id,))

    def put_service(self, record: ServiceRecord) -> None:
        self._db.execute(
            "INSERT INTO services (service_id, element_name) VALUES (?, ?)"
            " ON CONFLICT(service_id) DO UPDATE SET element_name=excluded.element_name",
            dataclasses.astuple(record),
        )

    def delete_service(self, service_id: str) -> None:
        self._db.execute("DELETE FROM services WHERE service_id = ?", (service_id,))
