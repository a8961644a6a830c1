"""Hydra configs, installed as the package ``hybrid.conf`` so ``hybrid-train`` finds them anywhere."""
