"""Merge recipes: several adapters into one base, or whole models combined (mergekit's methods), streaming.

`recipe` parses and checks mergekit's YAML (no torch); `methods` holds the float32 math; `source` reads inputs
chunk by chunk with LoRAs folded on the fly and defines the plan operations; `planner` turns a recipe into the
engine's MergePlan; `run` drives a merge; `card` writes the model card.
"""
