"""megallava: LLaVA-style multimodal training on megatron-core's parallel primitives."""
__version__ = "0.1.0"

import warnings

# megatron-core warns at import time when TransformerEngine/apex are absent; they are optional accelerators here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*(Apex|apex) is not installed.*")
# Library noise that says nothing a user can act on (megatron-core 0.16 internals on torch 2.11+).
warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.\w+` is deprecated.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
warnings.filterwarnings("ignore", message=".*The .grad attribute of a Tensor that is not a leaf Tensor.*")
warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
warnings.filterwarnings("ignore", message=".*Please use DTensor instead and we are deprecating ShardedTensor.*")
warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated and will be removed.*")
