"""What the host service and the guest library both speak, and nothing either side owns.

Addresses and well-known ids (:mod:`.addresses`), the root of the error vocabulary with the
errors an address can raise (:mod:`.errors`), facts of the protocol such as the default target
and the token metadata key (:mod:`.defaults`), and the worker pool both sides run relay loops on
(:mod:`.workers`). The direction is one way: this package imports neither ``host_service`` nor
``guest_client`` (tests/unit/test_layering.py checks it).

This ``__init__`` imports nothing: the host's pure core imports :mod:`.addresses` and
:mod:`.errors` and must not pull in ``threading`` (:mod:`.workers`) on the way.
"""
