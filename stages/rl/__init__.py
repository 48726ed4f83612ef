"""The RLHF pieces: the reward model's preference loss, programmatic rewards, and PPO: its pure math,
its four models, rollouts (steps 1-2), the update (step 5) and PPO-ptx."""
