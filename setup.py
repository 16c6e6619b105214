"""Build steps that pyproject.toml cannot express declaratively.

Three generated artefacts, all produced here and never committed:

* ``ring._ring`` — the Cython ring core. Build flavour is chosen by environment:
  ``HVSOCK_BUILD=release`` (default: ``-O2``, warnings are errors, asserts off),
  ``HVSOCK_BUILD=debug`` (``-O0 -g``, asserts on, ``CYTHON_TRACE`` line tracing),
  ``HVSOCK_BUILD=asan`` (debug plus AddressSanitizer/UBSan; run under
  ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``, see ``make asan``).
* ``hvsock_tools._preload`` — the ``LD_PRELOAD`` library of ``hvsock run`` (plain C, no Python
  API: it is never imported, only found by path and loaded into other programs).
* ``hvsock.v1`` — protobuf/gRPC modules and ``.pyi`` stubs generated from ``protos/``
  with grpcio-tools. They are written into the source tree (git-ignored) whenever this
  file runs — before setuptools looks for packages — so regular wheels, sdists and
  editable installs all see the same files.
"""

from __future__ import annotations

import os
import pathlib
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
GENERATED_PACKAGE = ROOT / "hvsock"


def generate_protos() -> None:
    """Run protoc (from grpcio-tools) over every ``.proto`` under ``protos/``."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    # Make every generated directory a regular package (mypy and setuptools want that).
    for directory in {(ROOT / p).parent for p in protos}:
        while directory != ROOT:
            (directory / "__init__.py").touch()
            (directory / "py.typed").touch()
            directory = directory.parent


def ring_extension() -> list[Extension]:
    flavour = os.environ.get("HVSOCK_BUILD", "release")
    if flavour not in ("release", "debug", "asan"):
        sys.exit(f"HVSOCK_BUILD must be release, debug or asan, not {flavour!r}")
    compile_args = ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function"]
    link_args: list[str] = []
    macros: list[tuple[str, str | None]] = []
    directives = {"language_level": "3", "embedsignature": True}
    if flavour == "release":
        compile_args += ["-O2", "-Werror"]
        macros.append(("NDEBUG", None))
        directives.update(boundscheck=False, wraparound=False, initializedcheck=False)
    else:
        compile_args += ["-O0", "-g", "-UNDEBUG"]
        macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
        directives.update(linetrace=True, boundscheck=True, wraparound=False)
    if flavour == "asan":
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        compile_args += sanitize
        link_args += sanitize
    ext = Extension(
        "ring._ring",
        ["ring/_ring.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=macros,
        # ring/_hvring.h (atomics, futex) is included from the generated C under build/.
        include_dirs=["ring"],
        depends=["ring/_hvring.h", "ring/_layout.pxd"],
    )
    # Generated C goes under build/, never next to the sources.
    return cythonize(
        [ext], compiler_directives=directives, build_dir=f"build/cython-{flavour}", force=True
    )


def preload_extension() -> Extension:
    """The vsock shim: built as an extension module so that ``pip install``, editable
    installs and wheels all put it next to ``hvsock_tools`` (found with
    ``importlib.util.find_spec``). Only the socket functions it takes over are exported."""
    return Extension(
        "hvsock_tools._preload",
        ["hvsock_tools/preload/hvsock_preload.c"],
        extra_compile_args=["-Wall", "-Wextra", "-Werror", "-O2", "-fvisibility=hidden"],
        libraries=["dl", "pthread"],
    )


generate_protos()
setup(ext_modules=[*ring_extension(), preload_extension()])
