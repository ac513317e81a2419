"""HTTP: the FastAPI app around a Classifier, and its page."""
