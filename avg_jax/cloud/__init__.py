"""Cloud launch helpers (gcloud command builders for TPU VMs and pod slices)."""
