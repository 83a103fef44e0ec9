"""How the model is spread over processes, and how processes are started.

strategies        one object per strategy (DDP, DeepSpeed ZeRO, FSDP2): accelerator, sharding, prepare, export, checkpoint layout
rules             what each strategy refuses, how it is recognised, what each rank holds (no torch)
deepspeed_config  the recipe's DeepSpeed JSON: found, checked against the recipe, "auto" filled; the ZeRO stage
launch            what the process launcher set up: world size, launch hints, precision, accelerate's settings
mesh              the process mesh a recipe asks for (HSDP replicate x shard, sequence or context split), checked torch-free
sequence          Ulysses sequence parallelism: which rows a rank reads, its slice of each row, DeepSpeed's split attention
slurm             sbatch scripts rendered and submitted; requeue on preemption
waiting           long waits (tokenising, exports) on a gloo group with its own timeout, not the training group's
"""
