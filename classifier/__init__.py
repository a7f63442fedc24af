"""The image classifier, a product of its own: heads on encoder features, their runs, training, evaluation."""
