"""prime: online RL for LLMs with implicit process rewards.

Importing this package is cheap: it never starts Ray and never imports deepspeed or vllm.
"""

__version__ = "0.1.0"
