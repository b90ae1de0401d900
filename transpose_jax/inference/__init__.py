"""Inference on any image: poses (`predict`), attention explanations (`explain`), pictures (`visualize`)."""
