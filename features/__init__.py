"""Everything that turns pixels into vectors: image loading, encoders, weights, the feature store."""
