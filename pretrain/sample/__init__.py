"""Sample data bundled with the package: tiny Shakespeare (public domain), the quickstart corpus."""

from pathlib import Path

BUNDLED_CORPUS = Path(__file__).parent / "tiny_shakespeare.txt"
