"""Prometheus exporter for the usage data of Posit Connect."""

__version__ = "0.1.0"
