"""Training: the loop (`trainer`), optimizer and schedule (`optim`), loss (`losses`)."""
