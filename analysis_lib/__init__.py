"""Library behind analysis.py: spectral math, the property tree, checkpoint IO, outputs, plots.

It uses the shared `core` package (atomic writes) and nothing from tools/; it changes no import path."""
