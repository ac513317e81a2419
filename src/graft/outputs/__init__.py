"""What a run shows a person: figures, HTML pages, the model card, the report."""
