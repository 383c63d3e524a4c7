"""comet-lab: a reproducible benchmark lab for comet (real-time push) servers.

Importing ``lab`` has no side effects. The roles are programs in their own right:
``python -m lab.comet``, ``python -m lab.agent``, ``python -m lab.monitor``; the controller
is the ``lab`` command (``lab.cli``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
