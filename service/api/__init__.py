"""The ``deeprx.v1.Receiver`` RPCs, grouped by concern; ``service/server.py`` joins them into one servicer."""
