"""Evaluation: the eval-mode forward, DARK decoding, OKS-NMS, COCO and MPII metrics, the loop."""
