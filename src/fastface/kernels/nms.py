"""Greedy non-maximum suppression of boxes, per group (Numba, GIL released).

MTCNN suppresses candidate boxes after every stage, once per image. In NumPy
that is a Python loop per kept box holding the GIL, which kept two detection
threads from overlapping; here every group (image) is one pass in compiled
code, and the GIL is released for the whole call.
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt

__all__ = ["grouped_nms"]


# No fastmath: overlaps are compared with the threshold exactly (a box at the
# threshold is kept), and the division by a clamped denominator must not be
# reassociated.
@numba.njit(cache=True, nogil=True)
def grouped_nms(
    boxes: npt.NDArray[np.float64],
    order: npt.NDArray[np.int64],
    starts: npt.NDArray[np.int64],
    threshold: float,
    use_min: bool,
    keep: npt.NDArray[np.int64],
) -> int:
    """Greedy suppression within each group; returns how many boxes are kept.

    ``order`` lists box indices group by group, each group best score first;
    group ``g`` is ``order[starts[g]:starts[g + 1]]``. A box is dropped when
    its overlap with a box kept before it in its group exceeds ``threshold``:
    intersection over union, or over the smaller area with ``use_min``.
    ``boxes`` rows are ``x1, y1, x2, y2``. Kept indices are written to
    ``keep`` (size ``order.size``) in ``order``'s order.
    """
    n_keep = 0
    dropped = np.zeros(order.shape[0], np.bool_)
    for g in range(starts.shape[0] - 1):
        lo, hi = starts[g], starts[g + 1]
        for a in range(lo, hi):
            if dropped[a]:
                continue
            i = order[a]
            keep[n_keep] = i
            n_keep += 1
            ax1, ay1, ax2, ay2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            area_i = (ax2 - ax1) * (ay2 - ay1)
            for b in range(a + 1, hi):
                if dropped[b]:
                    continue
                j = order[b]
                iw = min(ax2, boxes[j, 2]) - max(ax1, boxes[j, 0])
                ih = min(ay2, boxes[j, 3]) - max(ay1, boxes[j, 1])
                if iw <= 0.0 or ih <= 0.0:
                    continue
                inter = iw * ih
                area_j = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
                denom = min(area_i, area_j) if use_min else area_i + area_j - inter
                if inter / max(denom, 1e-12) > threshold:
                    dropped[b] = True
    return n_keep
