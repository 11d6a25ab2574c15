"""strangler: a feature-flagged strangler-fig migration proxy."""

__version__ = "0.2.0"
