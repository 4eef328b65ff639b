"""Shared code of the command-line tools in tools/ (each tool's code is tools/kit/<tool>.py)."""
