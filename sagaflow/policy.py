"""Kept for the runtime until it imports sagaflow.model: the compensation policy moved to
sagaflow/model/policy.py (whose mode_for now takes the settings from its caller)."""

from sagaflow.model.policy import (
    EMPTY,
    PLAIN,
    SAGA,
    FilePolicy,
    PolicyError,
    PolicySource,
    check_plain_capable,
    compensation_on,
    mode_for,
    parse,
    plain_blockers,
    source,
)

__all__ = ["EMPTY", "FilePolicy", "PLAIN", "PolicyError", "PolicySource", "SAGA", "check_plain_capable",
           "compensation_on", "mode_for", "parse", "plain_blockers", "source"]
