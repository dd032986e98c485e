"""Names every layer shares (configs -> search -> trainables -> biometry): defined here, imported
everywhere, so that no module keeps a copy. Plain values only: importing this module is free."""
from __future__ import annotations

OBJECTIVE = "val_measure_l1_mm"
"""What a trial reports each epoch and the search minimises: the mean of BPD and OFD L1 in mm."""

BEST_OBJECTIVE = f"best_{OBJECTIVE}"
"""A trial's lowest :data:`OBJECTIVE` so far (what Optuna is told and MLflow ranks by)."""

SPLITS = ("all", "train", "val", "test")
"""The splits ``evaluate --split`` accepts (``all`` = every record of the data)."""

ENSEMBLE_COMBINES = ("maps", "median")
"""How an ensemble combines its members: their output maps averaged before decoding, or the
median of each member's decoded landmarks."""
