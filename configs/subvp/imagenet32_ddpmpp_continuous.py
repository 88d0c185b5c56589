"""DDPM++ (continuous) on ImageNet 32x32 under the subVP SDE, as in the paper."""

from scoreflow.config_defaults import imagenet32_config


def get_config():
    return imagenet32_config("subvpsde", deep=False)
