"""Everything about text and batches: caption readers, cleaning, the vocabulary, splits, batches."""
