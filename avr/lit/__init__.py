"""Lightning modules: SFT and RL on one shared backbone."""
