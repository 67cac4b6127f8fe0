"""The OpenRLHF side of COMAL: the trainer that wraps OpenRLHF's DPOTrainer and runs Algorithm 1's outer loop
(``trainer``), the iteration sources and datasets (``data``, ``online``) and the sequence log-prob paths (``logps``).
The algorithm itself is ``comal_openrlhf.core``."""
