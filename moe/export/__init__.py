"""Export of a trained store as a serving bundle (see `moe.inference.bundle` for the format)."""
