"""unlearnbench: machine unlearning of in- vs out-of-distribution data in causal language models."""

import logging as _logging

# torchao (weight-only quantization for the attack stage) is imported by transformers whenever a model is built; on a
# CPU build of torch it logs missing CUDA kernels and torch deprecation notes that concern no computation here.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

__version__ = "0.2.0"
