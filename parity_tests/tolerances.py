"""Every parity tolerance, in one place (the README quotes this table, with the worst
difference each reached).

Relative differences are max|a - b| / max|b|, the PyTorch value b being the reference;
gradients are relative to the largest entry of that parameter's gradient.
"""
QUANTIZER = 1e-5  # z_q, codebook term, commitment term
NEAR_TIE = 1e-4  # argmins may differ only where the two best distances are closer than this,
#                  relative to the best distance's magnitude
FORWARD = 1e-4  # encoder output, reconstruction, loss terms (train and eval mode)
GRADIENT = 1e-4  # every parameter's gradient, codebook included
ZERO_GRADIENT = 1e-3  # conv biases feeding a BatchNorm, whose exact gradient is 0: each twin's
#                       |gradient| relative to the layer's largest weight gradient (rounding
#                       noise; PyTorch's own reaches 3.8e-4)
BATCHNORM = 1e-5  # running mean and variance after one train-mode step
TRAIN_LOSS = 1e-3  # float64: each of 50 Adam steps' loss terms
TRAIN_WEIGHTS = 2e-5  # float64: every parameter after 50 Adam steps
TRAIN_LOSS_FLOAT32 = 5e-2  # float32: each step's total loss; rounding amplified by Adam and
#                            the argmin (test_training.py)
EMA = 1e-9  # float64: the EMA codebook's counts, sums and codebook after 50 Adam steps
SAMPLE_TIE = 1e-4  # prior sampling: the twins may draw different codes at a position only
#                    where the two codes' scores (logit + Gumbel noise) are closer than this,
#                    relative to the position's largest |score|
