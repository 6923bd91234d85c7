"""Model registry, ResNet baselines, the lambda layer and Lambda-ResNets.

Knows nothing of data or training: `create_model(name, num_classes, image_size, **args)`.
"""

from lambdapipe.models import lambda_resnet as _lambda_resnet  # noqa: F401  (registers)
from lambdapipe.models import resnet as _resnet  # noqa: F401  (registers)
from lambdapipe.models.flops import estimate_flops, estimate_macs
from lambdapipe.models.lambda_layer import LambdaLayer
from lambdapipe.models.registry import (
    ModelError,
    check_model,
    count_params,
    create_model,
    list_models,
    model_hyperparameters,
    param_count,
    register_model,
)

__all__ = ["LambdaLayer", "ModelError", "check_model", "count_params", "create_model",
           "estimate_flops", "estimate_macs", "list_models", "model_hyperparameters",
           "param_count",
           "register_model"]
