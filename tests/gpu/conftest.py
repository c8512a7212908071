"""The GPU tier imports its helper modules (``nvlink_workers``, ``ll_workers``, ``placement``) by their
plain names: this folder goes on ``sys.path`` whatever pytest's import mode, and the spawned ranks
inherit that path, so they import the same workers by reference."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
