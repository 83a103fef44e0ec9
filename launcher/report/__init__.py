"""What the user sees and keeps: the console, metrics.jsonl, report.md and loss.png, the trackers.

console   header, phase indicators, training bar, end line
records   metrics.jsonl, per-rank logs, report.md, loss.png
trackers  TensorBoard, MLflow, Weights & Biases through accelerate
"""
