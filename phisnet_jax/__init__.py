"""PhiSNet in JAX: SE(3)-equivariant prediction of Fock and overlap matrices, and the
reference-data pipeline, AO-basis conventions and orbital featurizer that both pillars share."""
