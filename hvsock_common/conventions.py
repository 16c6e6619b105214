"""Facts the host service and its clients agree on that the proto does not carry.

Each was written out by hand on both sides (the default target three times, the token metadata
key three times); a change to one copy would have left a host and a client that no longer meet.
"""

from __future__ import annotations

import os
import pathlib
import secrets

__all__ = [
    "DEFAULT_TARGET",
    "MAX_ATTACH_BATCH",
    "TOKEN_METADATA",
    "default_host_token_file",
    "new_token",
]

#: Where ``hvsock-host`` listens unless told otherwise, and so where clients look first.
DEFAULT_TARGET = "127.0.0.1:50051"

#: gRPC metadata key carrying the host partition's token on admin calls.
TOKEN_METADATA = "x-hvsock-token"

#: Most requests in one AttachRequest.batch, and responses in one AttachResponse.batch (the
#: proto says 256). Attach messages are at most a few hundred bytes each, so a full batch stays
#: far below gRPC's 4 MiB receive default and the host's 1 MiB request limit.
MAX_ATTACH_BATCH = 256


def default_host_token_file() -> pathlib.Path:
    """Where ``hvsock-host`` writes a token it generated, and where the CLI reads it back."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return pathlib.Path(config) / "hvsock" / "host-token"


def new_token(nbytes: int = 32) -> str:
    """A random URL-safe token (``nbytes`` of randomness) that does not start with ``-``.

    One in 64 of ``secrets.token_urlsafe``'s does, and a command line then takes it for an
    option: ``hvsock --token -Xy...`` fails with "expected one argument" (it failed CI's CLI
    tests once). Drawing again keeps the alphabet, the length and all but a 64th of a bit of
    the randomness."""
    while (token := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass
    return token
