"""autoresearch: an overnight research lab on one computer or a cluster."""

__version__ = "0.1.0"
