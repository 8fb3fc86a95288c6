"""Input-dependent channel gating: a slimmable network with a gate per residual block, trained with a
compute penalty, exported so that skipped channels really cost nothing (see docs/compiler.md)."""
