"""Device profiles and the fleet simulator that runs real agents on simulated sensors.

- :mod:`devices.profiles`: ``PROFILES``, ``get_profile``, ``DeviceProfile`` (data);
- :mod:`devices.sim`: ``SimClock`` and ``SimSensors`` (battery, charger, load, heat);
- :mod:`devices.simulator`: ``Simulator``, ``SimConfig``, ``SimResult`` (N real agents, a real broker);
- :mod:`devices.serving`: ``ServerView`` (many agents, one loaded bundle);
- :mod:`devices.plots`: PNGs of a run (optional, matplotlib); :mod:`devices.cli`: ``edgeprune devices``.

May import :mod:`agent` (it runs real agents) and the contract; never :mod:`compiler` or :mod:`fleet`.
``docs/devices.md`` describes the model and the measured numbers.
"""

from devices.profiles import PROFILES, DeviceProfile, get_profile

__all__ = ["PROFILES", "DeviceProfile", "get_profile"]
