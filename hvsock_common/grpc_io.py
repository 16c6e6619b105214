"""Which of gRPC core's two I/O stacks an hvsock process runs on, chosen before grpc loads.

grpcio 1.85 moves a call's bytes on one of two stacks. Its default for clients and listeners,
the EventEngine, reads and writes on a pool of event-engine threads and hands each completion
to the thread that polls the call (a sync grpcio client's channel thread, a grpc.aio server's
poller); the older iomgr pollers do the reads and writes on the polling thread itself. Each gRPC
message costs a few thread hand-offs more on the EventEngine, and the relay exchanges many
messages: a connect alone is six. Measured on this project's 2-core machine, the same
``bench/bench_relay_ceiling.py --quick`` run with each stack, minutes apart:

========================================  ===========  =======
                                          EventEngine  pollers
========================================  ===========  =======
64 B round trip p50, sync grpcio echo     471 us       285 us
connect cycles, with an accepting peer    526/s        734/s
bidi stream with credit, 256 KiB frames   351 MB/s     540 MB/s
========================================  ===========  =======

and, for the round trip, 390-440 against 260-345 us of client CPU and 280-320 against
180-230 us of server CPU.

gRPC reads the choice once, when grpc is imported, from its own ``GRPC_EXPERIMENTS``
environment variable. :func:`choosing` sets it around that import to turn the EventEngine
client and listener off, and takes it away again after, so the processes a program starts keep
the environment they would have had. It changes nothing

* once grpc is imported (gRPC has read it then: the host service and the guest library each
  import grpc through it first, ``host_service/_grpc.py`` and ``guest_client/_grpc.py``, so a
  program that imports ``guest_client`` before grpc gets it, and one that does not keeps
  gRPC's default);
* over a ``GRPC_EXPERIMENTS`` the user set (theirs wins);
* with ``HVSOCK_GRPC_IO=grpc-default``, which leaves gRPC's own default.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["CHOICES", "ENV", "EXPERIMENTS", "GRPC_ENV", "choosing", "stack"]

#: The environment variable that chooses, and its values (the first is the default).
ENV = "HVSOCK_GRPC_IO"
CHOICES = ("pollers", "grpc-default")
#: gRPC's own variable, and the experiments turned off (grpcio 1.85's names: a test checks
#: that grpc knows them, since it only logs an error for a name it does not know).
GRPC_ENV = "GRPC_EXPERIMENTS"
EXPERIMENTS = "-event_engine_client,-event_engine_listener"

_chosen = False


@contextlib.contextmanager
def choosing() -> Iterator[bool]:
    """Wrap the process's first ``import grpc``; yields whether the pollers were chosen.
    ValueError names a value of HVSOCK_GRPC_IO that is neither choice."""
    choice = os.environ.get(ENV) or CHOICES[0]
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice != "pollers" or "grpc" in sys.modules or GRPC_ENV in os.environ:
        yield False
        return
    global _chosen
    os.environ[GRPC_ENV] = EXPERIMENTS
    try:
        yield True
    finally:
        os.environ.pop(GRPC_ENV, None)
    _chosen = True


def stack() -> str:
    """What this process's gRPC runs on, for reports: "pollers" when :func:`choosing` chose
    them, else what gRPC was left with ("grpc-default", or the user's GRPC_EXPERIMENTS)."""
    if _chosen:
        return "pollers"
    return f"{GRPC_ENV}={os.environ[GRPC_ENV]}" if os.environ.get(GRPC_ENV) else "grpc-default"
