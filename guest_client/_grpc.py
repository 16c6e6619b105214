"""grpc, loaded on the I/O stack hvsock processes run on (``hvsock_common.grpc_io``): the guest
library imports it before anything else, so a program that imports the library before grpc gets
the faster stack too."""

from hvsock_common import grpc_io

with grpc_io.choosing():
    import grpc  # noqa: F401 - loaded here for the choice; users import it as usual
