"""Between the vision tower and the LLM: the pre-LLM stage that runs a method on every image / crop / frame."""

from .selection import Encoded, Selection, apply_merges, budget_segments

__all__ = ["Encoded", "Selection", "apply_merges", "budget_segments"]
