"""Training machinery: the SFT/RM loop, the order data is seen in, checkpoints (SFT, RM and PPO),
the spike guard, the optimizer, and the export of a trained model."""
