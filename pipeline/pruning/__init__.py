"""Pruning: which filters go (selection), TPP's regularizer, the methods registry and physical removal."""
