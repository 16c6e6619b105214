"""One source for each ring fact: the C declarations in ``ring/_layout.pxd`` must agree with the
Python values in ``ring/_constants.py`` and ``ring/_errors.py``, and the pure-Python twin
(``ring/_pyring.py``) must import those values rather than spell them out again.

The test parses the ``.pxd`` source (its ``cdef enum:`` blocks and any ``DEF NAME = value``
lines), so it needs no compiled module and fails as soon as a number or a name differs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import ModuleType

import pytest

from ring import _constants, _errors

pytestmark = pytest.mark.unit

RING_DIR = Path(_constants.__file__).resolve().parent
LAYOUT_PXD = RING_DIR / "_layout.pxd"
PYRING = RING_DIR / "_pyring.py"

# Declared in C only, each with the reason the Python side has no copy.
C_ONLY: dict[str, str] = {
    # The pure-Python twin spins with the GIL held and never yields the CPU mid-spin.
    "SPIN_YIELD_AFTER_NS": "only the compiled ring's spin loop yields",
}

# Defined in Python only, each with the reason C has no copy.
PYTHON_ONLY: dict[str, str] = {
    # Byte offsets of the control words; C indexes u32 words instead (W_* = OFF_* / 4), which
    # test_word_indices_are_byte_offsets_over_four checks.
    **{
        name: "byte offset; C uses the W_ word index"
        for name in dir(_constants)
        if name.startswith("OFF_")
    },
    # Parts of HEADER_SIZE, which both sides declare.
    "DESCRIPTOR_SIZE": "HEADER_SIZE = DESCRIPTOR_SIZE + PIPE_HEADER_SIZE",
    "PIPE_HEADER_SIZE": "HEADER_SIZE = DESCRIPTOR_SIZE + PIPE_HEADER_SIZE",
    # Configuration defaults and limits checked by Python code (the host, the guest library,
    # Ring.__init__ of both implementations); the nogil code never sees them.
    "LINUX_GUEST_MAX_PAYLOAD": "a per-ring max_payload the caller passes in",
    "MAX_RING_PAGES": "checked by the host and the channel setup in Python",
    "DEFAULT_SEND_PAGES": "a configuration default",
    "DEFAULT_RECV_PAGES": "a configuration default",
    "DEFAULT_SPIN_NS": "read at import by both Ring modules (ring/_ring.pyx imports it)",
}

_ENUM_START = re.compile(r"^cdef\s+(?:packed\s+)?enum\b[^:]*:\s*(?:#.*)?$")
_ENUM_MEMBER = re.compile(r"^\s+([A-Za-z_]\w*)\s*=\s*(-?(?:0[xX][0-9a-fA-F]+|\d+))\s*(?:#.*)?$")
_DEF = re.compile(r"^DEF\s+([A-Za-z_]\w*)\s*=\s*(-?(?:0[xX][0-9a-fA-F]+|\d+))\s*(?:#.*)?$")
_CONST = re.compile(
    r"^cdef\s+(?:const\s+)?\w+\s+([A-Za-z_]\w*)\s*=\s*(-?(?:0[xX][0-9a-fA-F]+|\d+))"
)


def parse_layout(text: str) -> dict[str, int]:
    """Every integer the ``.pxd`` declares: ``cdef enum:`` members, ``DEF`` and ``cdef`` constants.

    A line inside an enum block that looks like a declaration but does not parse as
    ``NAME = integer`` is an error, so a new form of declaration cannot slip past the test.
    """
    found: dict[str, int] = {}

    def add(name: str, value: str, lineno: int) -> None:
        if name in found:
            raise AssertionError(f"_layout.pxd:{lineno}: {name} declared twice")
        found[name] = int(value, 0)

    in_enum = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if in_enum:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line[0].isspace():
                in_enum = False  # dedent: the block ended; fall through to the other forms
            else:
                m = _ENUM_MEMBER.match(line)
                if m is None:
                    raise AssertionError(f"_layout.pxd:{lineno}: cannot parse enum line {line!r}")
                add(m.group(1), m.group(2), lineno)
                continue
        if _ENUM_START.match(line):
            in_enum = True
        elif m := _DEF.match(line) or _CONST.match(line):
            add(m.group(1), m.group(2), lineno)
    return found


def python_values(*modules: ModuleType) -> dict[str, int]:
    """Public upper-case int constants of ``modules`` (a name in two modules is an error)."""
    values: dict[str, int] = {}
    for module in modules:
        for name, value in vars(module).items():
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name) or type(value) is not int:
                continue
            assert name not in values, f"{name} is defined in more than one Python module"
            values[name] = value
    return values


@pytest.fixture(scope="module")
def c_values() -> dict[str, int]:
    values = parse_layout(LAYOUT_PXD.read_text())
    # Guard the parser itself: the pxd holds dozens of numbers, among them these.
    assert len(values) > 40
    assert {"PAGE_SIZE", "W_CORRUPT", "ST_CLOSED", "CORRUPT_IDENTITY"} <= values.keys()
    return values


@pytest.fixture(scope="module")
def py_values() -> dict[str, int]:
    return python_values(_constants, _errors)


def test_every_c_value_matches_python(c_values: dict[str, int], py_values: dict[str, int]) -> None:
    wrong = {
        name: (value, py_values[name])
        for name, value in c_values.items()
        if name in py_values and py_values[name] != value
    }
    assert not wrong, f"(_layout.pxd, Python) values differ: {wrong}"


def test_no_name_on_one_side_only(c_values: dict[str, int], py_values: dict[str, int]) -> None:
    c_only = c_values.keys() - py_values.keys() - C_ONLY.keys()
    py_only = py_values.keys() - c_values.keys() - PYTHON_ONLY.keys()
    assert not c_only, (
        f"declared in ring/_layout.pxd only (add to Python or C_ONLY): {sorted(c_only)}"
    )
    assert not py_only, (
        f"defined in ring/_constants.py or ring/_errors.py only (add to _layout.pxd or "
        f"PYTHON_ONLY): {sorted(py_only)}"
    )


def test_allow_lists_are_not_stale(c_values: dict[str, int], py_values: dict[str, int]) -> None:
    assert C_ONLY.keys() <= c_values.keys() - py_values.keys()
    assert PYTHON_ONLY.keys() <= py_values.keys() - c_values.keys()


def test_word_indices_are_byte_offsets_over_four(py_values: dict[str, int]) -> None:
    offsets = {name[4:]: value for name, value in py_values.items() if name.startswith("OFF_")}
    words = {name[2:]: value for name, value in py_values.items() if name.startswith("W_")}
    assert offsets.keys() == words.keys()
    assert {name: off for name, off in offsets.items() if off != words[name] * 4} == {}


def test_parser_catches_a_changed_value(c_values: dict[str, int]) -> None:
    """The parse is of the real text: a changed number in it shows up in the parse."""
    text = LAYOUT_PXD.read_text()
    changed = text.replace("    ST_CLOSED = -7\n", "    ST_CLOSED = -8\n")
    assert changed != text
    assert parse_layout(changed)["ST_CLOSED"] == -8 != c_values["ST_CLOSED"]


def test_pyring_imports_rather_than_redefines(c_values: dict[str, int]) -> None:
    """ring/_pyring.py assigns none of the shared names; it imports each one it uses from
    ring._constants / ring._errors."""
    tree = ast.parse(PYRING.read_text())
    shared = c_values.keys() | PYTHON_ONLY.keys()
    assigned: set[str] = set()
    imported: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        assigned.add(sub.id)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module or ""
    redefined = sorted(assigned & shared)
    assert not redefined, f"ring/_pyring.py defines its own copy of {redefined}; import it"
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} & c_values.keys()
    not_imported = sorted(n for n in used if imported.get(n) not in ("_constants", "_errors"))
    assert not not_imported, f"ring/_pyring.py uses {not_imported} without importing them"
