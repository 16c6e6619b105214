"""``python -m host_service``: the same as the ``hvsock-host`` command."""

import sys

from host_service.server import main

sys.exit(main())
