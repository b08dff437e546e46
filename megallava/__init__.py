"""megallava: LLaVA-style multimodal training on megatron-core's parallel primitives."""
__version__ = "0.1.0"

import warnings

# megatron-core warns at import time when TransformerEngine/apex are absent; they are optional accelerators here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*(Apex|apex) is not installed.*")
