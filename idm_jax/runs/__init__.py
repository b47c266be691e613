"""Runs of the library: the run loop, the command lines, checkpoints, the work folder, its outputs
and exports, and studies."""
