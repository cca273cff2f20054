"""Data: the SynthScenes generator, shard / CSV / ImageFolder readers and writers, batch types."""
