"""Sagas for the tests of branches (the test worker imports this module: SAGAFLOW_IMPORTS)."""
