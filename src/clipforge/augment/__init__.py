"""Data augmentation by diffusion: GeNIe and GeNIe-Ada (Koohpayegani et al., arXiv 2312.02548).

Pure shard -> shard functions: `augment_genie` (genie.py) reads labelled images, edits each towards other classes'
prompts with a text-to-image diffusion model (sampler.py, on components loaded by diffusion.py) and writes labelled
shards; GeNIe-Ada (adaptive.py) picks the noise ratio per image from a frozen classifier's embeddings.
"""
