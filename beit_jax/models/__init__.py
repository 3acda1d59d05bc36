"""BEiT models: `create_model(name, **overrides)`, `Beit`, `BeitConfig`."""
from beit_jax.models.beit import Beit, BeitConfig
from beit_jax.models.registry import create_model, get_config, list_models, register

__all__ = ["Beit", "BeitConfig", "create_model", "get_config", "list_models", "register"]
