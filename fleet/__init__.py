"""The fleet manager: device registry, telemetry ingestion, staged rollouts, API and dashboard.

Imports the contract from :mod:`agent.contract`, never :mod:`compiler` (the fleet serves bundles, it does
not build them). So far it holds :mod:`fleet.broker`, which runs a private Mosquitto for the embedded
set-up, the demo and the tests.
"""

__all__: list[str] = []
