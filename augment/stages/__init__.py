"""The stages of one run, each a plain function over a run folder that declares what it reads (augment.stages.core):
generator.py (data, base, fine-tune, generate), choices.py (pseudo-labels and the run's choices, the synthetic
choice), outcome.py (filter, evaluate, publish, report). augment.pipeline lists them in order and walks the list."""
