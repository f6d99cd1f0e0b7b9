"""Sparse Mixture-of-Experts layers."""

from keras_moe.layers import losses
from keras_moe.layers import routing
from keras_moe.layers.dispatch import DroplessDispatcher
from keras_moe.layers.dispatch import EinsumDispatcher
from keras_moe.layers.dispatch import IndicesDispatcher
from keras_moe.layers.ensemble import EnsembleAverage
from keras_moe.layers.ensemble import EnsembleMoeLayer
from keras_moe.layers.ensemble import EnsembleTile
from keras_moe.layers.experts import Experts
from keras_moe.layers.mlp import Mlp
from keras_moe.layers.moe import MoeLayer
from keras_moe.layers.routers import ExpertsChooseRouter
from keras_moe.layers.routers import TokensChooseRouter
from keras_moe.layers.routing import DroplessRoutingInstructions
from keras_moe.layers.routing import RoutingInstructions
from keras_moe.layers.routing import expert_capacity
from keras_moe.layers.routing import experts_choose
from keras_moe.layers.routing import tokens_choose
from keras_moe.layers.routing import tokens_choose_dropless
