"""One trial: config -> data -> model -> train loop -> per-epoch report and checkpoint."""
