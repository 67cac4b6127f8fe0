"""The commands, each a thin parse -> build -> run over the library (``common`` holds what they share):

python -m openrlhf.cli.train_comal          train (served from ``train_comal``; every train_dpo flag plus COMAL's)
python -m comal_openrlhf.cli.generate       phase 1: sample a policy's responses to the iteration's prompts
python -m comal_openrlhf.cli.judge          phase 2: judge the samples into pair files
python -m comal_openrlhf.cli.evaluate       head-to-head win rates, exploitability, exact duality gaps
python -m comal_openrlhf.cli.demo           the CPU demo (the README's main job)
python -m comal_openrlhf.cli.game           the tabular game lab
python -m comal_openrlhf.cli.serve_judge    a judge behind HTTP
python -m comal_openrlhf.cli.run            any OpenRLHF entry point through the CPU runtime
python -m comal_openrlhf.cli.tiny           a tiny local model and pair files for a first launch
"""
