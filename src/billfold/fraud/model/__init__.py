"""The fraud model: synthetic data, training, scoring (being built)."""
