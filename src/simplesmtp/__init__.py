"""simplesmtp: an SMTP receiving server that keeps every accepted message safe."""

__version__ = "0.1.0"
