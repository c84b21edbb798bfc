"""Templates for exported bioimage.io packages: rdf.yaml (defaults) and model_card.md (string.Template).

Ships inside the wheel as `denoisplit_zoo.rdf_templates` (see pyproject.toml); read with importlib.resources."""
