"""The foundation both pillars stand on: molecules and elements, AO conventions and rotations,
the orbital featurizer, the run layer (run directory, versioned configuration, JSON-lines log,
checkpoints, the training-phase loop), device sharding, errors and command-line plumbing."""
