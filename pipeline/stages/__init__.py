"""raykd's stages layer: the stages: teachers, professor, distill, sweep, export, the run chain."""
