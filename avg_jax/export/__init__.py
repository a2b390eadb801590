"""Export of serving checkpoints and the Retriever."""
