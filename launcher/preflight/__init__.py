"""Every check on the user's input and environment that runs before torch loads.

checks       a command's recipe (or run directory) against this machine (or a target): launch, device support,
             extras, data rows
locations    the model's whereabouts and output_dir, checked before anything loads
modelfolder  the model folder read as files: config.json, weights headers (safetensors, GGUF, shard index),
             tokenizer, position limit
"""
