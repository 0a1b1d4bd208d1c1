"""DeepRx itself: model, featurizer, loss, training, evaluation and checkpoints; knows nothing of serving."""
