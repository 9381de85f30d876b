"""The model: the transformer (model), where every tensor lives (partitioning: the one table
of logical-axis rules), LoRA and freezing (peft; which projections: peft_targets), KV-cache
decoding (decoding) and FLOPs (flops).
"""
