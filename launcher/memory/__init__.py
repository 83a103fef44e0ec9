"""Memory planning: predicted per-rank peak memory of a recipe before any weights exist.

counts     bytes of weights, gradients and optimiser state, counted from tensors
inventory  what a model holds, from its config, on the meta device
estimate   the per-moment peak of a recipe (the plan)
zero       what DeepSpeed ZeRO-3 allocates beyond the partitions, from the effective DeepSpeed JSON
host       host (CPU) memory per node: loading, offloaded state, the export gather
lengths    the real lengths of the data's rows, for planning the largest batch it can form
advice     the cheapest recipe changes that make a plan fit, and train's check before it loads weights
"""
