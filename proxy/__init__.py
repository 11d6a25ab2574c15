"""strangler: a feature-flagged strangler-fig migration proxy."""

__version__ = "0.3.0"
