"""Unlearning stage: the method registry and the loop that runs a forget request (DESIGN.md §2.4, §4)."""
