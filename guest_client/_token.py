"""Where the host partition's token comes from when the caller does not give one.

Its own module, below the CLI, because the library (``attach_host``), the CLI, the bridge and
the testbed all look the token up the same way; in ``cli`` it made the library import its CLI.
"""

from __future__ import annotations

import os
import pathlib

from hvsock_common.conventions import default_host_token_file


def find_token(explicit: str | None) -> str | None:
    """--token, else HVSOCK_HOST_TOKEN, else the file hvsock-host writes a generated token to."""
    if explicit:
        return explicit
    if env := os.environ.get("HVSOCK_HOST_TOKEN"):
        return env
    path_text = os.environ.get("HVSOCK_HOST_TOKEN_FILE")
    path = pathlib.Path(path_text) if path_text else default_host_token_file()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
