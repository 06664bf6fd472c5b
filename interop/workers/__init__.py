"""Queue runners: the processes that take work from the one queue (analysis, delivery)."""
