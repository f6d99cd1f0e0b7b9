"""Dense models whose MLP blocks MoE layers can replace.

Each model class declares the stacks whose MLP blocks can be MoE blocks in
its `MOE_STACKS` (`MoeStack`s); `moe_layers` and
`with_eval_capacity_factor` read it.
"""

from keras_moe.models.moe_blocks import MoeStack
from keras_moe.models.moe_blocks import moe_layers
from keras_moe.models.moe_blocks import moe_stacks
from keras_moe.models.moe_blocks import with_eval_capacity_factor
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import t5_config
from keras_moe.models.vit import ViT
from keras_moe.models.vit import vit_config
from keras_moe.models.vlm import VisionLanguageModel
