"""Input pipeline: official TransPose top-down crops and heatmap targets.

Modules, lower first: `images` (reading images, bad-sample accounting),
`transforms` (crop geometry and the warp), `targets` (Gaussian heatmaps),
`jpeg_roi` (decoding only the region a crop reads), `datasets` (COCO / MPII
records), `tfds_builders` (ArrayRecord datasets for training without the raw
folders), `splits` (the records a config names), `pipeline` (grain train /
eval loaders), `synthetic` (the demo's synthetic COCO-format dataset).
Installed, this folder is `transpose_jax.input_pipeline`.
"""
