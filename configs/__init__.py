"""Experiment configs: `default.py` holds every field; the others override it."""
