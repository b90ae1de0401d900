"""Inference on any image: poses (`predict`), attention explanations (`explain`), pictures (`visualize`); the model as a file for other runtimes (`export`)."""
