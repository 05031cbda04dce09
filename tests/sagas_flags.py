"""Sagas for the tests of step flags and policy (the test worker imports this module: SAGAFLOW_IMPORTS)."""
