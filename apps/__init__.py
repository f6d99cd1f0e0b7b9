"""Command-line launchers (absl flags) for keras_moe: demo, benchmark."""
