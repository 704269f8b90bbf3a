"""Model and tokenizer I/O: GGUF files, Hugging Face checkpoint directories, model building."""

from compressjax.io.hf import load_hf, save_hf
from compressjax.io.loading import (build_model, load_model, model_params, open_model,
                                    resolve_model_path)

__all__ = ["build_model", "load_hf", "load_model", "model_params", "open_model",
           "resolve_model_path", "save_hf"]
