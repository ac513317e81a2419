"""Which model is best for a folder: candidates scored on folds within a budget."""
