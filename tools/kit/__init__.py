"""Shared code of the command-line tools in tools/ grouped by what they serve: patching (the
patch set and its tools), runs (logs, records, comparisons, sweeps), benchmarks, data. Imports go one way:
benchmarks -> runs -> patching -> core; data -> core. The shared core (shards, atomic files, source hashes)
is the top-level package `core`, beside analysis_lib, which the tools may also use."""
