"""Package discovery only; the metadata, dependencies and entry points are in setup.cfg.

Every package under `avr/` is found, so a new subpackage cannot be left out of the wheel. The
built-in plugins live in the top-level `modes/` and `rewards/` folders and install as `avr.modes`
and `avr.rewards` (`package_dir` in setup.cfg), so nothing generic lands in site-packages.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["avr", "avr.*"]), "avr.modes", "avr.rewards"])
