"""The model: its spec and package format (no torch), registry references, backbones, the network, loading."""
