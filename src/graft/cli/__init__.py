"""The `graft` command: each command parses, calls one library function, renders."""
