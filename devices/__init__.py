"""Device profiles and the fleet simulator that runs real agents on simulated sensors.

May import :mod:`agent` (it runs real agents) and the contract; never :mod:`compiler` or :mod:`fleet`.
Not built yet: issue #8.
"""

__all__: list[str] = []
