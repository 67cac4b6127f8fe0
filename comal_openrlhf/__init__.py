"""comal-openrlhf: COMAL (Liu et al., arXiv 2410.23223) as an OpenRLHF plugin."""

__version__ = "0.1.0"
