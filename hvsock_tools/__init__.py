"""The command-line programs, built on the guest library: ``hvsock`` (admin CLI, ``bridge``,
``hybrid-vsock``), the demo and the testbed workload. Nothing in the library imports them."""

# Before any of the programs imports grpc: the guest library chooses gRPC's I/O stack then.
import guest_client  # noqa: F401
