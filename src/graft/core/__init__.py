"""The base every layer stands on: errors, the config schema, runtime (device, precision, atomic
writes), the run folder's names, torchrun's process group, metrics. Imports nothing else of
graft's."""
