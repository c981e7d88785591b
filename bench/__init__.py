"""`make bench`: splitserve against its peers on the same prompts, weights and machine, in the same run."""
