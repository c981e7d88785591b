"""What the gateway and the engines agree on for disaggregated serving, beside engine.proto."""

# Trailing metadata of a decode engine's failed Prefill when the prefill engine it was given is at fault (died,
# full): its address. The gateway then tries another prefill engine with the same decode engine.
PREFILL_UNAVAILABLE = "splitserve-prefill-unavailable"
