"""The analysis pipeline: intake (queue a study), the worker, and the report it builds."""
