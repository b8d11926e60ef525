"""Export station: trained checkpoints to ONNX graphs and a manifest in a versioned model repository."""
