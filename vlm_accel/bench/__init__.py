"""Benchmarks: speed (``speed``) and accuracy (``vqa``). Each writes JSON + CSV + a plot and prints a table."""
