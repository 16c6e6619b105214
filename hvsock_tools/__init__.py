"""The command-line programs, built on the guest library: ``hvsock`` (admin CLI, ``bridge``,
``hybrid-vsock``), the demo and the testbed workload. Nothing in the library imports them."""
