"""Sampling and evaluation stages (filled in below)."""
