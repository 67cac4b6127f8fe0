"""The algorithm of COMAL (arXiv 2410.23223), plain NumPy / PyTorch: it knows nothing of OpenRLHF or argparse.

- ``losses``   the prox losses (ipo, dpo, sppo, rebel) around the centre of eq. (7), Algorithm 2's inner step;
- ``pairs``    judged samples -> preference pairs with their weights and win-rate targets;
- ``record``   an iteration's pairs with the cached log mu_k / log ref of every response;
- ``schedule`` presets, rounds, the reference-advance rule and the beta schedule (Algorithm 1's outer loop);
- ``judging``  the judge interface P(a beats b | x) and the exact judge of a known matrix;
- ``matrix``   the preference-matrix format of the tabular game;
- ``game``     the tabular game lab: closed-form prox steps and the losses solved on tabular policies.
"""
