"""Input pipeline: official TransPose top-down crops and heatmap targets.

Modules: `transforms` (crop geometry), `targets` (Gaussian heatmaps),
`datasets` (COCO / MPII records), `pipeline` (grain train / eval loaders),
`tfds_builders` (ArrayRecord datasets for training without the raw folders).
"""
