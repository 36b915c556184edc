"""What the binaries share: the command line and its config (schema, checks), the
workdir, a run's tokenizer and a trained model. Binaries import it; the library below
it (models, data, training, evaluation) never does."""
