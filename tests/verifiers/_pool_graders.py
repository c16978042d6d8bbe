"""Grader functions for the pool tests (module level, so worker processes can import them)."""

import os
import time


def misbehaving_grader(item, settings):
    """Behaviour chosen by the item: hang (in C, no signal helps), raise, die, or score."""
    action = item["response"]
    if action == "hang":
        time.sleep(3600)
    if action == "raise":
        raise RuntimeError("grader bug")
    if action == "die":
        os._exit(3)
    if action == "timeout":
        return 0.0, "timeout"
    return float(action), "ok"
