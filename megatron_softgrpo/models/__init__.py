"""Qwen2/Llama on Megatron-Core: architecture, model building, HF weights, checkpoints, sources."""
