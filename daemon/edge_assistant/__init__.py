"""edge-assistant: an offline assistant daemon for small machines."""

__version__ = "0.1.0"
