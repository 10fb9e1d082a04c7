"""Data for training: tokenizers, datasets and samplers."""
