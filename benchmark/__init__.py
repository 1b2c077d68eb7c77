"""MedAD-Bench: reproducible comparison of medical anomaly detection and segmentation methods."""

__version__ = "0.1.0"
