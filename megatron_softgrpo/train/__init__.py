"""The RL loop: rollout -> rewards -> advantages -> old/ref log-probs -> Megatron updates -> metrics, checkpoints."""
