"""Does a feature say where in the image it comes from? A linear probe.

Ridge regression (standardised features, a small penalty so that nearly collinear
features cannot overfit) from features to the row (and the column) of the grid cell each
one covers, fitted on half the images and scored (R^2) on the other half. R^2 near 1: the
position can be read off linearly; near 0: it cannot, so the decoder can only get it
from the rotary positions of the visual tokens.
"""

from __future__ import annotations

import numpy as np


def linear_probe_r2(features: np.ndarray, ridge: float = 1e-2) -> dict[str, float]:
  """{"row": R^2, "col": R^2} of a linear probe of features [N, side * side, C].

  Images [0, N/2) fit the probe, [N/2, N) score it. Token i covers row i // side,
  column i % side of a side x side grid.
  """
  n, length, channels = features.shape
  side = int(round(np.sqrt(length)))
  if side * side != length or n < 2:
    raise ValueError(f"features of shape {features.shape}: need [N >= 2, side*side, C]")
  x = features.reshape(n * length, channels).astype(np.float64)
  split = (n // 2) * length
  mean, std = x[:split].mean(0), x[:split].std(0) + 1e-8
  x = (x - mean) / std
  gram = x[:split].T @ x[:split] + ridge * split * np.eye(channels)
  out = {}
  for name, target in (("row", np.arange(length) // side), ("col", np.arange(length) % side)):
    y = np.tile(target, n).astype(np.float64)
    offset = y[:split].mean()
    w = np.linalg.solve(gram, x[:split].T @ (y[:split] - offset))
    residual = y[split:] - offset - x[split:] @ w
    out[name] = float(1.0 - residual.var() / y[split:].var()) if side > 1 else 0.0
  return out
