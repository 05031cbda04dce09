"""Settings from the environment, with defaults that run on a bare machine."""

from sagaflow.config.settings import Settings

__all__ = ["Settings"]
