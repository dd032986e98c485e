"""Presets (``presets/NAME.yaml``) and search spaces (``search/NAME.yaml``), shipped as package
data: ``search.cli`` finds them with ``importlib.resources.files("configs")``, installed or not."""
