"""Sagas for the tests of signals (the test worker imports this module: SAGAFLOW_IMPORTS)."""
