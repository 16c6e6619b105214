"""grpc, loaded on the I/O stack hvsock processes run on (``hvsock_common.grpc_io``): the host
service's entry point imports it before anything else."""

from hvsock_common import grpc_io

with grpc_io.choosing():
    import grpc  # noqa: F401 - loaded here for the choice; the modules import it as usual
