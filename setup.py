"""Build hook: ship the repo-root ``configs/*.yaml`` in the wheel as ``advantageflow/_configs``.

The configs stay at the repo root, where the README, the tests and the scripts name them; a
source checkout or an editable install reads them there (``advantageflow.cli.configs_dir``),
an installed wheel from the copy.  ``MANIFEST.in`` puts them in the sdist, so that a wheel
built from the sdist has them too.  Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies ``configs/*.yaml`` into ``advantageflow/_configs``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the repo's configs/ directly
            return
        target = Path(self.build_lib, "advantageflow", "_configs")
        self.mkpath(str(target))
        for path in sorted(CONFIGS.glob("*.yaml")):
            self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildPyWithConfigs})
