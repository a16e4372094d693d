"""Every parity tolerance, in one place (the README quotes this table).

Relative differences are max|a - b| / max|b|, the PyTorch value b being the reference;
gradients are relative to the largest entry of that parameter's gradient.
"""
QUANTIZER = 1e-5  # z_q, codebook term, commitment term
NEAR_TIE = 1e-4  # argmins may differ only where the two best distances are closer than this,
#                  relative to the best distance's magnitude
FORWARD = 1e-4  # encoder output, reconstruction, loss terms (train and eval mode)
GRADIENT = 1e-4  # every parameter's gradient, codebook included
BATCHNORM = 1e-5  # running mean and variance after one train-mode step
TRAIN_LOSS = 1e-3  # each of 50 Adam steps' loss
TRAIN_WEIGHTS = 1e-2  # every parameter after 50 Adam steps
