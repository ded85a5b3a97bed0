"""An algorithm for the fault tests: AdvantageFlow whose loss turns NaN on chosen steps."""

from __future__ import annotations

from dataclasses import dataclass

from advantageflow.algorithms.advantageflow import AdvantageFlow


class NaNLossAdvantageFlow(AdvantageFlow):
    """Yields NaN losses for the first ``nan_times`` micro-batches seen at step ``nan_step``."""

    @dataclass
    class Config(AdvantageFlow.Config):
        nan_step: int = -1
        nan_times: int = 1

    def losses(self, batch, ctx):
        poison = ctx.step == self.cfg.nan_step and getattr(self, "_emitted", 0) < self.cfg.nan_times
        if poison:
            self._emitted = getattr(self, "_emitted", 0) + 1
        for term in super().losses(batch, ctx):
            if poison:
                term.loss = term.loss * float("nan")
            yield term
