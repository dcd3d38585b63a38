"""The pipeline data plane: activation frames, stage links and the stage runner loop."""
