"""``python -m host_service``: the same as the ``hvsock-host`` command."""

from host_service.server import main

main()
