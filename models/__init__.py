"""Model-specific pre/post-processing for edgec."""
