"""Keras models and what runs them: caption decoders, classifier heads, decoding, run directories."""
