"""SavedModel export of keras_moe models for TensorFlow Serving."""
