"""kmoe launch: SLURM job rendering and submission."""
