"""keras_moe: sparse Mixture-of-Experts layers and upcycling for Keras 3."""
