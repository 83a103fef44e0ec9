"""Evaluation: eval loss for every task plus the metric each task is judged by.

evaluate  the eval pass (loss, generation or logits) and the best-checkpoint decision
metrics   pure metric functions over lists of strings
"""
