"""DDPM++ (continuous) on CIFAR-10 under the subVP SDE, as in the paper."""

from scoreflow.config_defaults import cifar10_config


def get_config():
    return cifar10_config("subvpsde", deep=False)
