"""Datasets: cards, the BMAD folder layout, the synthetic generator, splits and image loading."""
