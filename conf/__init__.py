"""pqsweep's configs, importable so that Hydra loads them as pkg://pqsweep.conf from a checkout and from a wheel alike."""
