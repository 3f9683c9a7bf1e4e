"""What a user composes to predict: the segmenter, its engines, sliding windows, TTA and
post-processing. Imports no job and no runner."""
