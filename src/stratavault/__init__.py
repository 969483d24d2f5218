"""Stratavault: backup and replication for virtualized infrastructure."""

__version__ = "0.1.0"
