"""Prefect flows over the augment library: thin tasks, one per stage."""
