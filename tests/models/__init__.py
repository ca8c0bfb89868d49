"""Real models from their libraries' constructors (transformers, torchvision, RNNs)."""
