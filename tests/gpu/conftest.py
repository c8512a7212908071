"""The GPU tier imports its helper modules (``nvlink_workers``, ``ll_workers``, ``placement``) by their
plain names, and the CPU tier's workers as ``dist_cpu.*``: this folder and ``tests`` go on
``sys.path`` whatever pytest's import mode, and the spawned ranks inherit that path, so they import
the same workers by reference."""

from __future__ import annotations

import sys
from pathlib import Path

for _path in (str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
