"""Real ONNX person-detector graphs with known outputs, for the detector tests.

Each graph is a small torch module exported by torch.onnx: a constant head
output in one of the layouts `inference.detect.OnnxDetector` reads, plus one
score that is read from the bottom-right input pixel, which the letterbox
pads with 114 (raw for YOLOX, normalised for RTMDet): the score only comes
out right when the pre-processing is the detectors' own.
"""

import pathlib
import warnings

import numpy as np

from transpose_jax.inference import detect

INPUT_HW = (64, 64)
NUM_CLASSES = 80


def _export(module, path: pathlib.Path, output_names) -> pathlib.Path:
  import torch  # pylint: disable=g-import-not-at-top  # a dev requirement only
  # The TorchScript exporter needs no onnxscript (not a requirement); it
  # warns that it is deprecated.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    torch.onnx.export(module, torch.zeros(1, 3, *INPUT_HW), str(path),
                      input_names=['input'], output_names=list(output_names),
                      dynamo=False, opset_version=17)
  return path


def _module(constants, pad_masks):
  """outputs[i] = constants[i] + pad_masks[i] * (bottom-right pixel of channel 0)."""
  import torch  # pylint: disable=g-import-not-at-top

  class Head(torch.nn.Module):

    def __init__(self):
      super().__init__()
      for i, (c, m) in enumerate(zip(constants, pad_masks)):
        self.register_buffer(f'c{i}', torch.as_tensor(c))
        self.register_buffer(f'm{i}', torch.as_tensor(m))

    def forward(self, x):
      pixel = x[0, 0, -1, -1]
      outs = []
      for i in range(len(constants)):
        c, m = getattr(self, f'c{i}'), getattr(self, f'm{i}')
        outs.append(c + (m * pixel).to(c.dtype))
      return tuple(outs)

  return Head().eval()


def yolox_raw(anchors) -> tuple[np.ndarray, np.ndarray]:
  """YOLOX's head output [1, A, 5 + 80] and the objectness mask of the pad
  pixel, from (stride, x1, y1, x2, y2 in network-input pixels, objectness
  or None (read from the pad pixel: 114 -> 0.8), class, class score)."""
  cells, strides = detect.yolox_grid(INPUT_HW)
  raw = np.zeros((1, len(cells), 5 + NUM_CLASSES), np.float32)
  mask = np.zeros_like(raw)
  for stride, x1, y1, x2, y2, objectness, label, class_score in anchors:
    center = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    cell = np.floor(center / stride)
    index = int(np.flatnonzero((strides[:, 0] == stride) & np.all(cells == cell, 1))[0])
    assert not raw[0, index].any(), 'two test boxes share an anchor'
    raw[0, index, :2] = center / stride - cell
    raw[0, index, 2:4] = np.log([(x2 - x1) / stride, (y2 - y1) / stride])
    if objectness is None:
      mask[0, index, 4] = 0.8 / detect.PAD_VALUE
    else:
      raw[0, index, 4] = objectness
    raw[0, index, 5 + label] = class_score
  return raw, mask


def yolox_file(path: pathlib.Path, anchors) -> pathlib.Path:
  raw, mask = yolox_raw(anchors)
  return _export(_module([raw], [mask]), path, ['output'])


def end2end_file(path: pathlib.Path, dets, labels, pad_score_row=None, *,
                 labels_first: bool = False) -> pathlib.Path:
  """mmdeploy's end2end outputs: dets [1, N, 5] (x1, y1, x2, y2, score in
  network-input pixels) and labels [1, N]; row pad_score_row's score gets
  the (normalised) pad pixel added."""
  dets = np.asarray(dets, np.float32)[None]
  mask = np.zeros_like(dets)
  if pad_score_row is not None:
    mask[0, pad_score_row, 4] = 1.0
  labels = np.asarray(labels, np.int64)[None]
  outputs = [('dets', dets, mask), ('labels', labels, np.zeros(labels.shape, np.float32))]
  if labels_first:
    outputs.reverse()
  return _export(_module([o[1] for o in outputs], [o[2] for o in outputs]), path,
                 [o[0] for o in outputs])


def other_file(path: pathlib.Path, shape=(1, 10)) -> pathlib.Path:
  """A graph of no detector layout (default: one [1, 10] output)."""
  return _export(_module([np.zeros(shape, np.float32)], [np.zeros(shape, np.float32)]),
                 path, ['logits'])
