"""The soft-token math, model-free and TP-aware: mixtures, samplers, noises, log-densities."""
