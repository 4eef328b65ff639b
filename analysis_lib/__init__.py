"""Library behind analysis.py: spectral math, the property tree, checkpoint IO, outputs, plots."""
