"""What sits on top of a loaded model: LoRA (`lora`), textual-inversion embeddings (`embeddings`); ControlNet later.

Adapters change a pipeline's networks in place and hand back a handle that undoes the change;
they never build pipelines and know foreign key layouts only through `t2i.checkpoints`.
"""
