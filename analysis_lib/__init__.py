"""Library behind analysis.py: spectral math, the property tree, checkpoint IO, outputs, plots."""

import os
import sys

# The result files are written with tools/kit's atomic writer; make it importable from anywhere.
_TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)
