"""The pipeline's stages. One entry module per stage, each exposing `run(cfg, run_dir)` and launched
as `accelerate launch -m stages.<name> --run-dir D`: sft, reward, ppo, baseline, compare. What they
share lives in sub-packages named for their concern: core, modeling, training, rl, evaluation (see
README, "Layout")."""
