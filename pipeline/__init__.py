"""tpp-pipeline: structured pruning of CNNs with Trainability Preserving Pruning (Wang & Fu, ICLR 2023)."""
