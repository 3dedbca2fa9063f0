"""Export: a fitted scikit-learn head → a trainable torch module; FeatstackNet = preprocessing +
backbones + that head, saved as safetensors + JSON (never a pickle).

Converters made for inference (hummingbird, sklearn-onnx) freeze the numbers and reduce an SVC
to its labels. Here every exported number is an ``nn.Parameter``, so the network can be
fine-tuned, and each module reproduces scikit-learn's own outputs on the cached features.

The work is split by job; this module keeps the public names in one place:

* :mod:`featstack.torch_heads` — the torch head modules (linear, Gaussian NB, SVC, vote, stack);
* :mod:`featstack.convert` — fitted scikit-learn heads and fusions → those modules, dispatched
  through the head and fusion registries (``export_head``, ``model_converter``);
* :mod:`featstack.network` — FeatstackNet: build from a saved model, save, load, ONNX
  (``export_model``, ``load_network``);
* :mod:`featstack.preprocess` — the image decoding and centre-squaring the network shares with
  extraction (``decode_to_square``, ``decode_squares``).
"""
from __future__ import annotations

from .convert import (FUSION_CONVERTERS, HEAD_CONVERTERS, convert_plain, convert_stack,
                      convert_vote, export_head, model_converter, sklearn_head)
from .network import (NETWORK_FORMAT, NETWORK_FORMAT_VERSION, NETWORK_JSON, NETWORK_ONNX,
                      NETWORK_TENSORS, FeatstackNet, _spec_from_info, build_network, export_model,
                      export_onnx, load_network, read_network_config, rebuild_backbone, save_network)
from .preprocess import decode_squares, decode_to_square
from .torch_heads import (DTYPES, LINEAR_KINDS, SVC_KERNELS, Affine, ExportError,
                          GaussianNBHead, HeadModule, LinearHead, StackHead, SVCHead, VoteHead,
                          head_from_config, sklearn_log_proba)

__all__ = ["FUSION_CONVERTERS", "HEAD_CONVERTERS", "convert_plain", "convert_stack", "convert_vote", "export_head",
           "model_converter", "sklearn_head", "NETWORK_FORMAT", "NETWORK_FORMAT_VERSION", "NETWORK_JSON",
           "NETWORK_ONNX", "NETWORK_TENSORS", "FeatstackNet", "build_network", "export_model", "export_onnx",
           "load_network", "read_network_config", "rebuild_backbone", "save_network", "decode_squares",
           "decode_to_square", "DTYPES", "LINEAR_KINDS", "SVC_KERNELS", "Affine", "ExportError", "GaussianNBHead",
           "HeadModule", "LinearHead", "StackHead", "SVCHead", "VoteHead", "head_from_config", "sklearn_log_proba",
           "_spec_from_info"]
