"""Training callbacks for FAVOR attention."""

from keras_favor.callbacks.redraw_random_features import RedrawRandomFeatures, redraw_seed

__all__ = ["RedrawRandomFeatures", "redraw_seed"]
