"""Fault injection for the reliability tests: die with SIGKILL at a chosen moment.

Set ``ADVANTAGEFLOW_KILL_AT=PHASE:N`` to make the process kill itself (``kill -9``, no
clean-up) the ``N``-th time it reaches ``PHASE``; phases are ``rollout`` (after sampling),
``reward`` (after scoring), ``train`` (after an optimizer step) and ``checkpoint`` (after
the checkpoint's files are written, before the rename that publishes it) and ``rewrite``
(a run-folder file such as ``metrics.jsonl`` written to its temporary name, before the rename).  Unset, this costs
one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def fault_point(phase: str) -> None:
    """Kill this process here if ``ADVANTAGEFLOW_KILL_AT`` names this phase and count."""
    spec = os.environ.get("ADVANTAGEFLOW_KILL_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != phase:
        return
    _counts[phase] = _counts.get(phase, 0) + 1
    if _counts[phase] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
