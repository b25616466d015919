"""Source models: the catalogue, weight loading and the adapted target model."""

from medxfer.models.adapt import MedxferNet, build_model, load_weights, target_model
from medxfer.models.catalog import SourceSpec, list_sources, resolve_source

__all__ = ["MedxferNet", "SourceSpec", "build_model", "list_sources", "load_weights", "resolve_source", "target_model"]
