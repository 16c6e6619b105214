"""VMBus-style single-producer/single-consumer byte rings in shared memory."""

import os

if os.environ.get("HVSOCK_RING_IMPL") == "python":
    IMPLEMENTATION = "python"
else:
    import ring._ring  # noqa: F401  (compiled; an ImportError is a build error, not a fallback)

    IMPLEMENTATION = "cython"
