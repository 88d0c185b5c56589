"""A tiny DDPM++ on scikit-learn's 8x8 digits under the subVP SDE."""

from scoreflow.config_defaults import small_config


def get_config():
    return small_config("digits", "subvpsde")
