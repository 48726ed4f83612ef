"""Models and tensors: loading and saving model folders, the chat format, padding, EOS masks and
log-probs, generation, the reward model's score, and which weights train (LoRA, frozen layers)."""
