"""Sampling from a policy, Algorithm 1's step 1 (y ~ mu_k(. | x)): HF ``generate`` on the trained module
(``sampling``) or vLLM engines that receive the policy's weights after each iteration (``vllm_engines``)."""
