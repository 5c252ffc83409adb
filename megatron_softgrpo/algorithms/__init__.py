"""The RL algorithm's math: group advantages and the policy loss shared by every algorithm."""
