"""Leaf modules shared by every layer (imports nothing else from dino_fast): schedules, finite
checks, checkpoint I/O and fault points, distributed helpers, image statistics."""
