"""The refinement loop: generate → filter → distill → tune → evaluate → report, round after round."""

STAGES = ("generate", "filter", "distill", "tune", "evaluate", "report")
