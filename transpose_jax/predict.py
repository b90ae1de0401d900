r"""Poses on photos, videos and a camera: top-down inference on person boxes.

  python -m transpose_jax.predict --checkpoint=tp_r_a3 \
      --image=photos/ [--boxes=detections.json | --detector=yolox_m.onnx] \
      --output=poses/
  python -m transpose_jax.predict --checkpoint=tp_r_a3 --video=clip.mp4 \
      --detector=yolox_m.onnx [--det_every=10] --output=poses/
  python -m transpose_jax.predict --checkpoint=tp_r_a3 --camera=0 \
      --detector=yolox_m.onnx --output=poses/

Person boxes: --boxes (a detection file), --detector=FILE.onnx (a YOLOX or
RTMDet person detector as rtmlib / mmdeploy export them, run by
onnxruntime) or --detector=hog (OpenCV 4's people detector: nothing to
download, but weak; OpenCV 5 has none). In a video or camera stream the detector runs every
--det_every frames, boxes from the previous frame's poses in between; a
detection file's image ids are then frame indices (0-based). Writes
OUTPUT/<name>_pose.mp4 and OUTPUT/<name>.json (COCO results entries with
frame and track_id; `inference.video.predict_video`).

--image is one image file or a folder of them. --boxes is a person detection
file in the COCO format (a list of {image_id, category_id, bbox [x, y, w, h],
score}); an image's id is the number its file name spells, as in COCO
(000000000785.jpg -> 785). Detections scoring below --image_thre (default
config.data.image_thre) are dropped, as in evaluation. Without --boxes every
image is one person box, and image ids are the numbers the file names spell
when those are distinct, else 1..N (IMG_0001.jpg and DSC_0001.jpg stay two
images). Writes OUTPUT/keypoints.json (COCO results format), OUTPUT/images.json
(which file each image id is) and OUTPUT/<name>_pose.jpg per image
(`inference.predict.predict_path`).
"""

import os

from absl import flags

from transpose_jax import cli
from transpose_jax.checkpoints import store
from transpose_jax.inference import detect
from transpose_jax.inference import predict
from transpose_jax.inference import video

DEFAULT_CONFIG = cli.config_path('tp_r_a3')

_CONFIG = cli.config_flag(DEFAULT_CONFIG, 'Model config', from_checkpoint=True)
_CHECKPOINT = cli.checkpoint_flag()
_IMAGE = flags.DEFINE_string('image', None, 'An image file or a folder of images.')
_VIDEO = flags.DEFINE_string('video', None, 'A video file (mp4, avi, ...).')
_CAMERA = flags.DEFINE_integer('camera', None, 'A camera index (0: the first camera).')
_BOXES = flags.DEFINE_string(
    'boxes', None, 'Person detections json (COCO format; in a video, image ids are '
    'frame indices); default: the whole image is one person.')
_DETECTOR = flags.DEFINE_string(
    'detector', None, 'Person detector: a YOLOX / RTMDet .onnx file (rtmlib, mmdeploy) '
    'or hog (OpenCV\'s people detector: no download, weak).')
_DET_SCORE = flags.DEFINE_float('det_score', 0.5, 'ONNX detector score threshold.')
_DET_EVERY = flags.DEFINE_integer(
    'det_every', 10, 'Videos: run the detector every N frames; boxes from the previous '
    'frame\'s poses in between.')
_MAX_FRAMES = flags.DEFINE_integer('max_frames', None, 'Videos: stop after N frames.')
_OUTPUT = flags.DEFINE_string('output', None,
                              'Output folder (keypoints.json, <name>_pose.jpg; videos: '
                              '<name>_pose.mp4, <name>.json).')
_IMAGE_THRE = flags.DEFINE_float(
    'image_thre', None, 'Detection score threshold (default config.data.image_thre).')
_KPT_THRESHOLD = flags.DEFINE_float(
    'kpt_threshold', None, 'Joints scoring below it are not drawn (default '
    'config.data.in_vis_thre).')
flags.mark_flags_as_required(['checkpoint', 'output'])


def main(argv) -> None:
  del argv
  given = [f'--{name}' for name, flag in
           (('image', _IMAGE), ('video', _VIDEO), ('camera', _CAMERA))
           if flag.value is not None]
  if len(given) != 1:
    raise ValueError(f'{" and ".join(given) or "no input"}: pass one of --image '
                     '(a file or folder), --video (a file) or --camera (an index)')
  config = _CONFIG.value
  image_thre = (float(config.data.image_thre) if _IMAGE_THRE.value is None
                else _IMAGE_THRE.value)
  # Images read --boxes by file name in predict_path (not as a detector): a
  # detector from the file is made for videos only.
  detector = detect.make_detector(
      _DETECTOR.value, boxes_file=_BOXES.value, image_thre=image_thre,
      score_thr=_DET_SCORE.value, load_boxes=_IMAGE.value is None)
  if _IMAGE.value is None:
    source = _VIDEO.value if _VIDEO.value is not None else _CAMERA.value
    if _VIDEO.value is not None:
      video.open_video(source).release()  # a bad file fails before the model loads
    model = store.restore_model(_CHECKPOINT.value, config)
    results = video.predict_video(
        model, config, source, _OUTPUT.value, detector=detector,
        det_every=_DET_EVERY.value, kpt_threshold=_KPT_THRESHOLD.value,
        max_frames=_MAX_FRAMES.value)
    name = video.video_name(source)
    frames = len({r['frame'] for r in results})
    print(f'{len(results)} poses in {frames} frames with persons -> '
          f'{os.path.join(_OUTPUT.value, name + "_pose.mp4")}, '
          f'{os.path.join(_OUTPUT.value, name + ".json")}')
    return
  predict.list_images(_IMAGE.value)  # a video given as --image fails here, early
  model = store.restore_model(_CHECKPOINT.value, config)
  results = predict.predict_path(
      model, config, _IMAGE.value, _OUTPUT.value, detection_file=_BOXES.value,
      image_thre=_IMAGE_THRE.value, kpt_threshold=_KPT_THRESHOLD.value,
      detector=detector)
  images = len({r['image_id'] for r in results})
  print(f'{len(results)} poses in {images} images -> '
        f'{os.path.join(_OUTPUT.value, "keypoints.json")} (image ids: '
        f'{os.path.join(_OUTPUT.value, predict.IMAGES_FILE)}; pictures: *_pose.jpg)')


def run() -> None:
  """The `transpose-predict` command."""
  cli.run(main, default_config=DEFAULT_CONFIG, doc=__doc__, usual_keys=('eval.flip_test', 'eval.batch_size', 'data.keypoints_file'),
          errors=(FileNotFoundError, ValueError, OSError))


if __name__ == '__main__':
  run()
