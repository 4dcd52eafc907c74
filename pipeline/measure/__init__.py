"""Measurements of networks: size, compute, latency, trainability."""
