"""The model: tokenizer and weights for the task, the method (full, freeze, LoRA family, QLoRA), the loss.

loading   tokenizer, model class for the task, weights from a folder, hub cache or GGUF; the method applied
adapters  which modules an adapter run adapts, trains in full or keeps unquantised; LoRA variants
loss      each task's objective as a sum and a count, so batches and ranks reduce exactly
preference  the DPO objective: reply log-probs of policy and adapter-disabled reference, sigmoid and IPO losses
"""
