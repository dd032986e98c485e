"""biometry: the fetal head biometry domain library (no Ray inside)."""
from biometry.errors import BiometryInputError
from biometry.records import LANDMARK_NAMES, LandmarkRecord

__all__ = ["BiometryInputError", "LandmarkRecord", "LANDMARK_NAMES"]
__version__ = "0.1.0"
