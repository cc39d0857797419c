"""Models: presets, loading, and the plain-torch reference forward."""

from polarc.models.load import Model, load_model
from polarc.models.presets import DEFAULT_MODEL, PRESETS, ModelSpec, get_preset

__all__ = ["DEFAULT_MODEL", "PRESETS", "Model", "ModelSpec", "get_preset", "load_model"]
