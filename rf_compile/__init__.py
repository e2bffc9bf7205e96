"""rf_compile: RainFusion sparse attention as a torch.compile backend."""
