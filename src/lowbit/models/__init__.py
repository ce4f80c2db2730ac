"""Model zoo: a registry of small CNNs, MLPs and LLaMA-shaped language models for QAT.

``create_model("resnet20", num_classes=10, in_shape=(3, 32, 32))`` builds a model by name;
``list_models()`` lists the names. Every model is built from ``nn.Conv2d`` / ``nn.Linear`` /
``nn.BatchNorm*`` / ``nn.ReLU`` modules, traces with ``torch.fx``, and registers its first
quantisable layer first and its classifier last.
"""

from .layers import init_weights
from .lenet import LeNet5
from .llama import KVCache, LlamaConfig, LlamaForCausalLM
from .mlp import MLP
from .registry import create_model, list_models, model_options, model_task, register_model
from .resnet import BasicBlock, CifarResNet, ShortcutA
from .vgg import VGGSmall

__all__ = [
    "MLP",
    "BasicBlock",
    "CifarResNet",
    "KVCache",
    "LeNet5",
    "LlamaConfig",
    "LlamaForCausalLM",
    "ShortcutA",
    "VGGSmall",
    "create_model",
    "init_weights",
    "list_models",
    "model_options",
    "model_task",
    "register_model",
]
