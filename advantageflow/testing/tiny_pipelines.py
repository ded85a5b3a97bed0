"""Moved to :mod:`advantageflow.models.tiny_pipelines` (``model.path: tiny:KIND`` builds them,
so they belong to the model layer); this name stays for ``python -m`` and old imports."""

from advantageflow.models.tiny_pipelines import *  # noqa: F403
from advantageflow.models.tiny_pipelines import main

if __name__ == "__main__":
    main()
