"""What every training recipe shares, as plain functions.

accelerator  the Accelerator, seeded, with process-wide settings
batches      the deterministic, resumable order of examples, split over processes
step         THE optimiser step and its one accumulation convention
optim        AdamW variants, fp32 master weights for pure bf16, learning-rate schedules
checkpoints  resumable checkpoints written atomically
memory       memory estimates checked before a run starts
savers       gradient checkpointing, attention implementation, offloading frozen models
sharding     FSDP on CPU and GPU, full state dicts of sharded models
runs         run folders, atomic writes, seeds, trackers and the metrics log
"""
