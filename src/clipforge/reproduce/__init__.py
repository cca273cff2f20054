"""Reproductions in miniature: each method against its baseline on SynthScenes, equal steps and data, several
seeds, mean +- std, written to docs/results.md by `clipforge reproduce <method>`."""
