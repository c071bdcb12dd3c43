"""Export of a trained store as a serving bundle (see `moe.serving.bundle` for the format)."""
