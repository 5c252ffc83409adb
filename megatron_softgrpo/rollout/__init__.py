"""Decoding on the Megatron model: soft thinking phase, discrete answer phase, trajectory records."""
