"""AdvantageFlow: online RL fine-tuning of flow-matching (rectified-flow) generators.

Time convention: ``t = 0`` is data, ``t = 1`` is noise; ``x_t = (1 - t) x0 + t eps`` and the
model predicts the velocity ``v ~ eps - x0`` (see :mod:`advantageflow.types`).
"""

__version__ = "0.1.0"

import os as _os

# MKL's strict reproducible mode, so that matrix products (and the gradients built from them)
# do not depend on the torch thread count; MKL reads it at its first call, hence here and not
# in advantageflow.numerics (which explains it).  A value the user set wins.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
