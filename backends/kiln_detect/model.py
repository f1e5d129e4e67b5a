"""kiln_detect: a Python-based Triton backend turning a YOLO-style detection head into boxes.

Selected in a model's config.pbtxt with `backend: "kiln_detect"`. Tensor contract: two inputs, the
model's raw head FP32 (or FP16) [batch, 4 + classes, candidates] (YOLOv8's layout; with
`layout: candidates_first`, [batch, candidates, 4 + classes]; cx, cy, w, h in the model input's
pixels, then the class scores) and kiln_image's transform FP32 [batch, 6] (scale_x, scale_y,
pad_x, pad_y, width, height) -> five outputs padded to max_detections rows: boxes FP32
[batch, M, 4] (x1, y1, x2, y2 in the original image's pixels, clipped to it), scores FP32
[batch, M], classes INT64 [batch, M], labels BYTES [batch, M] (from `labels_file` in the model's
folder) and count INT32 [batch, 1]. Per item: best class per candidate, score threshold, optional
class filter, greedy NMS per class (numpy), mapping back through the transform. Dynamic batching:
the decoding runs once per dynamic batch; a request with a malformed head or transform fails
alone, naming the input and the item. The logic lives in `kiln.serving.detect` (parameters:
`DETECT_PARAMS`); this file only hands it to the adapter.
"""

from __future__ import annotations

from kiln.serving.adapter import python_model
from kiln.serving.detect import load

TritonPythonModel = python_model(load)
