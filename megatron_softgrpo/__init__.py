"""megatron-softgrpo: SofT-GRPO (Gumbel-reparameterised soft-thinking policy optimisation) on Megatron-Core."""

__version__ = "0.1.0"
