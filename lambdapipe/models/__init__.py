"""Model registry, ResNet baselines, the lambda layer and Lambda-ResNets.

Knows nothing of data or training: `create_model(name, num_classes, image_size, **args)`.
"""

from lambdapipe.models import resnet as _resnet  # noqa: F401  (registers the ResNets)
from lambdapipe.models.registry import (
    ModelError,
    count_params,
    create_model,
    list_models,
    model_hyperparameters,
    register_model,
)

__all__ = ["ModelError", "count_params", "create_model", "list_models",
           "model_hyperparameters", "register_model"]
