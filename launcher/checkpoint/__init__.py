"""Checkpoints that survive crashes, exact resume, and the final export.

saves      atomic checkpoint folders (temporary name, then rename), the final export
layouts    what a checkpoint holds under each strategy and method
universal  ZeRO full fine-tuning checkpoints converted once to DeepSpeed's universal format, to resume on another count
verify     saves read back and compared before they count
diskspace  free space checked before each save
"""
