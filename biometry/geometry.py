"""Pure numpy geometry of the four landmarks, vectorised over leading axes.

Landmark arrays are ``(..., 4, 2)`` of (x, y) with rows BPD1, BPD2, OFD1, OFD2.

>>> import numpy as np
>>> lm = np.array([[50, 20], [50, 80], [10, 50], [90, 50]], float)
>>> [float(v) for v in diameter_lengths(lm)]
[60.0, 80.0]
>>> float(diameter_angle_deg(lm)), float(centre_offset(lm))
(90.0, 0.0)
"""
from __future__ import annotations

import numpy as np

from biometry.records import BPD, OFD


def diameter_lengths(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BPD and OFD lengths in pixels: ``(...,4,2) -> ((...), (...))``."""
    lm = np.asarray(landmarks, dtype=float)
    bpd = np.linalg.norm(lm[..., BPD[1], :] - lm[..., BPD[0], :], axis=-1)
    ofd = np.linalg.norm(lm[..., OFD[1], :] - lm[..., OFD[0], :], axis=-1)
    return bpd, ofd


def ellipse_perimeter(axis_a, axis_b) -> np.ndarray:
    """Ramanujan's second approximation of the perimeter of an ellipse given its FULL axes.

    ``pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h)))`` with semi-axes ``a, b`` and
    ``h = ((a - b) / (a + b))^2``; the HC18 head circumference is this perimeter of the expert
    ellipse. Broadcasts; returns 0 where both axes are 0. Units follow the inputs.
    """
    a = np.abs(np.asarray(axis_a, dtype=float)) / 2
    b = np.abs(np.asarray(axis_b, dtype=float)) / 2
    s = a + b
    h = np.divide((a - b) ** 2, s**2, out=np.zeros(np.broadcast(a, b).shape), where=s > 0)
    return np.pi * s * (1 + 3 * h / (10 + np.sqrt(4 - 3 * h)))


def diameter_angle_deg(landmarks: np.ndarray) -> np.ndarray:
    """Angle between the BPD and OFD lines in degrees, in [0, 90]: ``(...,4,2) -> (...)``.

    The lines are undirected, so endpoint order does not matter; 90 for an ellipse's axes.
    NaN where a diameter has zero length.
    """
    lm = np.asarray(landmarks, dtype=float)
    d_bpd = lm[..., BPD[1], :] - lm[..., BPD[0], :]
    d_ofd = lm[..., OFD[1], :] - lm[..., OFD[0], :]
    norm = np.linalg.norm(d_bpd, axis=-1) * np.linalg.norm(d_ofd, axis=-1)
    cos = np.abs(np.sum(d_bpd * d_ofd, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norm > 0, cos / norm, np.nan)
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


def centre_offset(landmarks: np.ndarray) -> np.ndarray:
    """Distance in pixels between the BPD midpoint and the OFD midpoint: ``(...,4,2) -> (...)``."""
    lm = np.asarray(landmarks, dtype=float)
    mid_bpd = lm[..., BPD, :].mean(axis=-2)
    mid_ofd = lm[..., OFD, :].mean(axis=-2)
    return np.linalg.norm(mid_bpd - mid_ofd, axis=-1)


def ellipse_landmarks(center, axes, angle_deg: float) -> np.ndarray:
    """The four landmarks (4, 2) of an ellipse given as OpenCV's ``RotatedRect``.

    ``center`` (x, y), ``axes`` FULL lengths (w, h) with ``w`` along the direction ``angle_deg``
    (degrees from the x axis towards y, as ``cv2.fitEllipse`` and ``cv2.ellipse`` use it) and ``h``
    perpendicular to it. BPD = the minor-axis endpoints, OFD = the major-axis endpoints; within a
    pair the endpoint with the smaller (x, y) comes first.
    """
    c = np.asarray(center, dtype=float)
    w, h = (float(v) for v in axes)
    t = np.radians(angle_deg)
    u = np.array([np.cos(t), np.sin(t)]) * w / 2
    v = np.array([-np.sin(t), np.cos(t)]) * h / 2
    minor, major = (u, v) if w <= h else (v, u)
    return np.stack([*_ordered(c - minor, c + minor), *_ordered(c - major, c + major)])


def _ordered(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (p, q) if tuple(p) <= tuple(q) else (q, p)
