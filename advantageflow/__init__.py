"""AdvantageFlow: online RL fine-tuning of flow-matching (rectified-flow) generators.

Time convention: ``t = 0`` is data, ``t = 1`` is noise; ``x_t = (1 - t) x0 + t eps`` and the
model predicts the velocity ``v ~ eps - x0`` (see :mod:`advantageflow.types`).
"""

__version__ = "0.1.0"
