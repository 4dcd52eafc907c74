"""Training: the one loop every phase uses, its resumable state, distribution and the compiled step."""
