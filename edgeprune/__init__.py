"""The ``edgeprune`` command line: one entry point over the compiler, agent, fleet and devices.

This package sits above the four parts and may import any of them, lazily, per subcommand, so that
``edgeprune agent`` never loads the compiler's torch.
"""

__all__: list[str] = []
