"""dsmr: Depth-Structured Music Recurrence for full-piece symbolic music modeling."""

__version__ = "0.1.0"
