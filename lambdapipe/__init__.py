"""lambdapipe: LambdaNetworks vs ResNet baselines on small image datasets with noisy labels."""

__version__ = "0.1.0"
