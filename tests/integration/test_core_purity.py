"""The core must import with grpc, asyncio, time, threading and socket unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("grpc", "asyncio")
BLOCKED = (*FRAMEWORKS, "threading", "socket", "select", "selectors", "time", "random")

# The parent package (owned by the adapter) reads its version with importlib.metadata, which
# imports ``time`` and ``socket`` through the email package; so it is imported with only the
# frameworks blocked, and everything else is blocked after it, before the core is imported.
# A None entry in sys.modules makes ``import name`` raise ImportError, even if the module was
# loaded before.  The originals are put back at the end so the interpreter can shut down.
PROGRAM = textwrap.dedent(
    f"""
    import sys
    for name in {FRAMEWORKS!r}:
        sys.modules[name] = None
    import host_service
    saved = {{name: sys.modules.get(name) for name in {BLOCKED!r}}}
    for name in {BLOCKED!r}:
        sys.modules[name] = None
    assert "host_service.core" not in sys.modules
    import host_service.core as core
    # Every module of the core, not only those the package imports today.
    import importlib, os
    core_dir = os.path.dirname(core.__file__)
    modules = sorted(name[:-3] for name in os.listdir(core_dir) if name.endswith(".py"))
    for name in modules:
        importlib.import_module("host_service.core." + name)
    assert "host" in modules and "lifecycle" in modules, modules
    from host_service.core import HostCore, PARENT, service_id_for_port
    # Exercise it a little, still without the blocked modules.
    vm_id = "11111111-1111-4111-8111-111111111111"
    c = HostCore(host_token="t", token_factory=lambda: "v", guid_factory=lambda: vm_id)
    info, token, _ = c.create_partition("vm", 0.0)
    s, _ = c.attach(info.vm_id, token, 0.0)
    c.connect(s, PARENT, service_id_for_port(1), 0.0)
    assert c.next_deadline() == 2.0
    print("pure", len(core.__all__))
    for name, module in saved.items():
        if module is None:
            del sys.modules[name]
        else:
            sys.modules[name] = module
    """
)


def test_core_imports_without_io_modules() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pure ")


def test_blocking_really_blocks() -> None:
    # Guard against a vacuous test: the same trick makes a grpc/asyncio import fail.
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['asyncio'] = None; import asyncio"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "import of asyncio halted" in result.stderr
