"""Region proposals: selective search (OpenCV contrib), an on-disk cache per split, recall."""
