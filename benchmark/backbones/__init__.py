"""Backbones: an open_clip ViT wrapper with layer outputs and adapter hooks, weights, and a feature cache."""
