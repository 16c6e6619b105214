"""The emulated Hyper-V host: a pure core (``host_service.core``) and its grpc.aio adapter."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hvsock-emulator")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
