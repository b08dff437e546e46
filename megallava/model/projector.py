"""Vision -> LLM projector: LLaVA's ``linear`` or ``mlp2x_gelu`` (Linear, GELU, Linear), tensor-parallel."""
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def _no_init(_):
    pass


class Projector(MegatronModule):  # MegatronModule: its checkpoint keys know the TP sharding
    def __init__(self, kind: str, vision_hidden: int, llm_hidden: int, config):
        """``config`` must not be sequence-parallel: the projector runs on image features before the SP scatter."""
        super().__init__(config=config)
        if kind not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector {kind!r}: use one of {PROJECTOR_TYPES}")
        self.kind = kind
        if kind == "linear":
            self.linear_1 = ColumnParallelLinear(vision_hidden, llm_hidden, config=config, init_method=_no_init,
                                                 bias=True, gather_output=True)
        else:
            self.linear_1 = ColumnParallelLinear(vision_hidden, llm_hidden, config=config, init_method=_no_init,
                                                 bias=True, gather_output=False)
            self.linear_2 = RowParallelLinear(llm_hidden, llm_hidden, config=config, init_method=_no_init,
                                              bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x):
        x, _ = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            x, _ = self.linear_2(F.gelu(x))
        return x
