"""Inference: the Segmenter API, TTA, post-processing, the prediction job."""
