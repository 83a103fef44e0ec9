"""How the model is spread over processes, and how processes are started.

strategies  one object per strategy (DDP, DeepSpeed ZeRO, FSDP2): its rules, accelerate plugin, checkpoint layout
slurm       sbatch scripts rendered and submitted; requeue on preemption
waiting     long waits (tokenising, exports) on a gloo group with its own timeout, not the training group's
"""
