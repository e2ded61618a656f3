"""Seed- and zoo-compatible entry point: ``python run.py [GPU] --mode train --params X.yaml --model_dir D``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works from a plain checkout too

from sparsetrain.zoo_cli import run_py  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_py())
