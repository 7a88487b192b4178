"""Below the unlearn stage: the method registry (`methods`), LoRA (`lora`) and one forget request in named parts:
the loop (`request`), its state (`state`), who runs and writes what (`worker`), the checkpoint of an interrupted
request (`checkpoint`) and the outcome summary of a finished one (`outcome`)."""
