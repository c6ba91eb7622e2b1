"""A fake Posit Connect server with the real API's usage semantics, for tests and demos.

Stands apart from the rest of ``exporter``: it imports only the standard library, so it
behaves like an independent server and cannot share the exporter's bugs.
"""

from .clock import Clock
from .config import SimConfig
from .core import Simulator
from .faults import Faults
from .server import SimServer

__all__ = ["Clock", "Faults", "SimConfig", "SimServer", "Simulator"]
