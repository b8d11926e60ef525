"""Training station: data sets, the model families of the lecture, training and evaluation."""
