"""Focus-dLLM pieces: the confidence indicator, attention sinks and sink-aware block selection."""
