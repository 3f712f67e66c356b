"""rvqllm: residual vector quantization for Hugging Face causal LMs.

Public API::

    import rvqllm
    cfg = rvqllm.RVQConfig.load("2bit")
    report = rvqllm.quantize(model, cfg, calibration_ids)   # in place
    rvqllm.save(model, "out/", tokenizer)
    model = rvqllm.load("out/")                              # or, after `import rvqllm`:
    model = AutoModelForCausalLM.from_pretrained("out/")   # same model, any transformers API
    results = rvqllm.evaluate(model, tokenizer, {"kjv": text})
"""

from . import hf
from .checkpoint import load, save
from .config import RVQConfig
from .errors import RVQError
from .eval import evaluate
from .nn import QuantizedLinear
from .pipeline import quantize

hf.register()  # AutoModelForCausalLM.from_pretrained reads rvqllm checkpoints from now on

__version__ = "0.1.0"
__all__ = ["QuantizedLinear", "RVQConfig", "RVQError", "evaluate", "load", "quantize", "save"]
