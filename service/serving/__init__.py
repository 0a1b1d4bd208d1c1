"""The serving runtime the server is assembled from: batching, registry, sample store, metrics, replicas."""
