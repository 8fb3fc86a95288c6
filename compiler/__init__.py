"""The host-side compiler: PyTorch model -> signed bundle of dense, gated and statically pruned variants.

May import the contract from :mod:`agent.contract`; never :mod:`fleet` or :mod:`devices`.
"""

__all__: list[str] = []
