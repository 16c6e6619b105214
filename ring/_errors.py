"""Status codes of the ring core and their one mapping to Python exceptions.

The ``nogil`` code (and, for symmetry, the pure-Python twin) never raises: every operation
returns a status. :func:`status_error` is the single place where a status becomes an exception,
so both implementations raise exactly the same types, errno values and messages.
"""

from __future__ import annotations

import errno

# Status codes (negative; >= 0 means success). Keep in sync with ring/_layout.pxd.
ST_OK = 0
ST_AGAIN = -1  # non-blocking call would block -> BlockingIOError
ST_TIMEOUT = -2  # deadline passed -> TimeoutError
ST_RESCINDED = -3  # write on a rescinded ring -> BrokenPipeError
ST_FIN_SENT = -4  # write after fin() -> BrokenPipeError
ST_INTR = -5  # a signal arrived while sleeping; run handlers, retry (never escapes)
ST_CORRUPT = -6  # details in the ring's corrupt reason/a/b -> RingCorruptError
ST_CLOSED = -7  # ring already closed -> OSError(EBADF)

# Corruption reasons (also the value stored in the control page's `corrupt` word).
CORRUPT_WRITE_INDEX = 1
CORRUPT_READ_INDEX = 2
CORRUPT_SHORT_PACKET = 3
CORRUPT_DESC_TYPE = 4
CORRUPT_OFFSET8 = 5
CORRUPT_LEN8 = 6
CORRUPT_PIPE_TYPE = 7
CORRUPT_DATA_SIZE = 8
CORRUPT_TRAILER = 9
CORRUPT_INDEX_MOVED = 10
CORRUPT_PARTIAL = 11
CORRUPT_PEER = 12  # the control page says some end found the ring corrupt
CORRUPT_IDENTITY = 13  # magic/version/data_size words do not describe this mapping

_EPROTO, _EBADMSG = errno.EPROTO, errno.EBADMSG
_REASONS: dict[int, tuple[int, str]] = {
    CORRUPT_WRITE_INDEX: (_EPROTO, "write_index {a} out of range or unaligned (data size {b})"),
    CORRUPT_READ_INDEX: (_EPROTO, "read_index {a} out of range or unaligned (data size {b})"),
    CORRUPT_SHORT_PACKET: (_EBADMSG, "only {a} bytes used at read_index {b}: not a packet"),
    CORRUPT_DESC_TYPE: (_EBADMSG, "descriptor type {a} at offset {b} is not 6 (in-band)"),
    CORRUPT_OFFSET8: (_EBADMSG, "descriptor offset8 {a} at offset {b} is not 2"),
    CORRUPT_LEN8: (_EBADMSG, "packet length {a} exceeds the {b} bytes used, or its header"),
    CORRUPT_PIPE_TYPE: (_EBADMSG, "pipe header type {a} at offset {b} is not 1 (data)"),
    CORRUPT_DATA_SIZE: (_EBADMSG, "pipe data_size {a} does not match packet length {b}"),
    CORRUPT_TRAILER: (_EBADMSG, "packet trailer {a:#x} does not record start offset {b}"),
    CORRUPT_INDEX_MOVED: (_EPROTO, "own index changed behind our back: expected {b}, found {a}"),
    CORRUPT_PARTIAL: (_EBADMSG, "partly read packet shrank: {a} bytes consumed, data_size {b}"),
    CORRUPT_PEER: (_EPROTO, "ring was marked corrupt (reason {a}) by an end"),
    CORRUPT_IDENTITY: (_EPROTO, "identity words (magic {a:#x}, size {b}) do not match the buffer"),
}


class RingCorruptError(OSError):
    """The ring's control page or a packet is impossible: a peer bug or a hostile peer.

    ``errno`` is ``EPROTO`` for bad indices / control words and ``EBADMSG`` for bad framing.
    ``reason`` is the numeric reason code (also stored in the control page so the other end
    reports the corruption too).
    """

    reason: int

    def __init__(self, reason: int, a: int = 0, b: int = 0) -> None:
        err, fmt = _REASONS.get(reason, (errno.EPROTO, "ring corrupt (reason {a})"))
        super().__init__(err, "corrupt ring: " + fmt.format(a=a, b=b))
        self.reason = reason

    @classmethod
    def reported(cls, err: int, message: str) -> RingCorruptError:
        """The error another process found in a ring this end reads through it (the host
        service, for a relayed end): ``err`` and ``message`` as that process reported them."""
        exc = cls(CORRUPT_PEER)
        exc.errno, exc.strerror = err, message
        return exc


def status_error(status: int, reason: int = 0, a: int = 0, b: int = 0, *, op: str = "") -> OSError:
    """Return the exception for a failed ``status`` (the one conversion point)."""
    if status == ST_AGAIN:
        what = "ring is full" if op == "write" else "ring is empty"
        return BlockingIOError(errno.EAGAIN, f"{what} (operation would block)")
    if status == ST_TIMEOUT:
        return TimeoutError(errno.ETIMEDOUT, f"ring {op or 'operation'} timed out")
    if status == ST_RESCINDED:
        return BrokenPipeError(errno.EPIPE, "channel rescinded")
    if status == ST_FIN_SENT:
        return BrokenPipeError(errno.EPIPE, "write after FIN (shutdown for writing)")
    if status == ST_CORRUPT:
        return RingCorruptError(reason, a, b)
    if status == ST_CLOSED:
        return OSError(errno.EBADF, "ring is closed")
    return OSError(errno.EIO, f"unexpected ring status {status}")
