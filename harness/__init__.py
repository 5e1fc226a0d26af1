"""fastrestart: a harness that proves, or disproves, that a VMM fast restart keeps a guest intact."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
"""The source tree: guest recipes, kernel fragments and matrices live beside the library."""
