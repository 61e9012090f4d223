"""driftline: production drift monitoring for vision models."""

__version__ = "0.1.0"
