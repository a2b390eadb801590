"""Evaluation: Recall@K under the Karpathy protocol, efficiency, reports."""
