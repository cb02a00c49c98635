"""chai-compile: Clustered Head Attention for deployment (profile -> mapping -> rewrite -> export -> verify)."""

__version__ = "0.1.0"
