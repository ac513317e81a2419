"""The end-to-end doors that join the layers below: train (config -> data -> backbone -> job ->
fit -> save -> report)."""
