"""The environment of a child Python process a test starts: the test's own environment (or `base`),
with this repository first on the import path, plus `extra` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env | extra
