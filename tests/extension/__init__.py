"""A model and a dataset that live only here: proof that a new component is one module plus one
YAML file, found through Hydra's search path, with no edit under src/ or configs/."""
