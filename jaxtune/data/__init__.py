"""Instruction data: files -> normalised conversations -> masked token examples -> packed, resumable batches."""
