"""The engine service: model weights, the paged KV cache, the scheduler and the step loop. Never sees text."""
