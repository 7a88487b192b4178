"""Preset configs shipped with the package (smoke, default, paper)."""
