"""Model definition: config, layers, attention, the transformer, sharding rules."""
