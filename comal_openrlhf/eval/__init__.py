"""Evaluation of policies (arXiv 2410.23223, sections 3 and 6): the exact duality gap on a finite game (``exact``),
head-to-head win rates with bootstrap intervals and exploitability (``winrate``), and the reports (``report``)."""
