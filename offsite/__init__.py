"""Offsite: federated, privacy-preserving adaptation of language models.

The code lives in the design's top-level folders, mapped into this package by
setuptools (`emulators/` is `offsite.emulators`, `server/` is `offsite.server`, ...).
"""

__version__ = "0.1.0"
