"""Source models: the catalogue, weight loading and the adapted target model."""

from medxfer.models.adapt import MedxferNet, build_model, load_run_model
from medxfer.models.catalog import SourceSpec, list_sources, resolve_source

__all__ = ["MedxferNet", "SourceSpec", "build_model", "list_sources", "load_run_model", "resolve_source"]
