"""What trains on which data (a Job per strategy) and the loop that trains it."""
