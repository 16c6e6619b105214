"""Hyper-V sockets for programs: the standard socket API over the emulated host."""
