"""Schemas shared by the client (simulator) and the service (receiver).

Neither side imports the other; both read scenario specs and slot datasets
through this package.
"""
