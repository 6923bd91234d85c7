"""The community fork's README prints parameter counts cut, not rounded (docs/models.md): its
LambdaResNet-200 reads 35.29M where ours is 35.30M, the same network."""

from __future__ import annotations

import math

import pytest
import torch

from lambdapipe.models import count_params
from lambdapipe.models.registry import create_model


def cut(value: float, digits: int) -> float:
    return math.floor(value * 10**digits) / 10**digits


# (model, the fork README's figure, its decimals), 1000 classes at 224 px, k16 h4 u1 r23
PRINTED = [("lambda_resnet200", 35.29, 2), ("lambda_resnet152", 32.8, 1),
           ("lambda_resnet50", 14.9, 1), ("lambda_resnet50", 14.99, 2)]


@pytest.mark.parametrize("name, printed, digits", PRINTED)
def test_the_fork_prints_our_count_cut(name, printed, digits):
    with torch.device("meta"):
        millions = count_params(create_model(name, 1000, 224)) / 1e6
    assert cut(millions, digits) == pytest.approx(printed)


def test_lambda_resnet200_rounds_to_35_30_and_cuts_to_35_29():
    with torch.device("meta"):
        n = count_params(create_model("lambda_resnet200", 1000, 224))
    assert n == 35_295_912 and f"{n / 1e6:.2f}" == "35.30" and cut(n / 1e6, 2) == 35.29
